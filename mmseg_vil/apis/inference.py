"""Segment many images with a trained model: class-index masks and colour overlays, robust to bad files.

``mmseg.apis.inference_model`` segments images already in memory; this module adds what a user-facing tool needs
around it: expanding a file, folder or glob into images, batching, a progress bar, writing results, and reporting
unreadable files instead of aborting the whole run on the first one.

For every input ``<rel>.<ext>`` (``rel`` is the path relative to the inputs' common folder, so equal names in
different folders do not collide) it writes

* ``<out_dir>/pred/<rel>.png``: the predicted class index of every pixel (the model's classes, 0-based; ``uint8``,
  or ``uint16`` for models with more than 256 classes), at the input's resolution;
* ``<out_dir>/vis/<rel>.png``: the input blended with the class colours of the model's palette.
"""
import glob
import os
import os.path as osp
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import mmcv
import numpy as np
import torch
from mmengine.model import revert_sync_batchnorm
from mmengine.utils import ProgressBar
from mmseg.apis import inference_model, init_model
from torch import nn

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


@dataclass
class InferenceSummary:
    """What happened to each input: written outputs, or the reason it was skipped."""

    outputs: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # input -> (mask path, overlay path)
    failures: Dict[str, str] = field(default_factory=dict)  # input -> reason

    @property
    def total(self) -> int:
        return len(self.outputs) + len(self.failures)

    def report(self) -> str:
        lines = [f'{self.total} images: {len(self.outputs)} segmented, {len(self.failures)} failed']
        lines += [f'  FAILED {path}: {reason}' for path, reason in self.failures.items()]
        return '\n'.join(lines)


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Expand image files, folders (recursively, image extensions only) and glob patterns into a sorted path list.

    An explicitly named file is kept whatever its extension or content, so that a bad file is reported rather than
    silently ignored.
    """
    paths = []
    for item in inputs:
        if osp.isdir(item):
            for folder, _, names in os.walk(item):
                paths += [osp.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif osp.isfile(item):
            paths.append(item)
        else:
            matches = [p for p in glob.glob(item, recursive=True) if osp.isfile(p)]
            if not matches:
                raise FileNotFoundError(f'{item!r} is neither a file, a folder nor a glob matching any file')
            paths += matches
    return sorted(set(osp.normpath(p) for p in paths))


def init_segmentor(config: str, checkpoint: Optional[str], device: str = 'cpu') -> nn.Module:
    """``mmseg.apis.init_model``, then SyncBN -> BN on CPU as MMSegmentation's demos do.

    One process has no group to synchronise with, and some PyTorch versions reject CPU input to SyncBN.
    """
    model = init_model(config, checkpoint, device=device)
    return revert_sync_batchnorm(model) if torch.device(device).type == 'cpu' else model


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """Blend a BGR image with the RGB ``palette`` colour of each pixel's class."""
    colours = palette[mask][..., ::-1].astype(np.float32)
    return np.clip((1 - opacity) * image + opacity * colours, 0, 255).astype(np.uint8)


@contextmanager
def _progress(total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``update(n)`` of a progress bar: tqdm when installed (rate, ETA), else MMEngine's always-present bar."""
    if not enabled:
        yield lambda n: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        bar = ProgressBar(total)
        yield bar.update
        bar.file.write('\n')  # MMEngine's bar leaves the cursor on its line
        return
    with tqdm(total=total, unit='img') as bar:
        yield bar.update


def _batches(items: Sequence[str], batch_size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _group_by_shape(images: Iterable[Tuple[str, np.ndarray]]) -> List[List[Tuple[str, np.ndarray]]]:
    """Split a batch into same-size groups: at test time SegDataPreProcessor only stacks equally sized images."""
    groups: Dict[tuple, List[Tuple[str, np.ndarray]]] = {}
    for path, image in images:
        groups.setdefault(image.shape, []).append((path, image))
    return list(groups.values())


class SegmentationWriter:
    """Runs a segmentor over image files and writes masks and overlays (see the module docstring for the layout)."""

    def __init__(self, model: nn.Module, out_dir: str, opacity: float = 0.5, batch_size: int = 1) -> None:
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f'opacity must be in [0, 1], got {opacity}')
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.model = model
        self.out_dir = out_dir
        self.opacity = opacity
        self.batch_size = batch_size
        self.palette = np.asarray(model.dataset_meta['palette'], np.uint8)
        self.mask_dtype = np.uint8 if len(self.palette) <= 256 else np.uint16

    def output_paths(self, path: str, root: str) -> Tuple[str, str]:
        stem = osp.splitext(osp.relpath(osp.abspath(path), root))[0]
        return osp.join(self.out_dir, 'pred', stem + '.png'), osp.join(self.out_dir, 'vis', stem + '.png')

    def _segment(self, group: List[Tuple[str, np.ndarray]], root: str, summary: InferenceSummary) -> None:
        try:
            results = inference_model(self.model, [image for _, image in group])
        except Exception as error:  # noqa: BLE001  (one bad group must not stop the others)
            summary.failures.update((path, f'inference failed: {error!r}') for path, _ in group)
            return
        for (path, image), result in zip(group, results):
            mask = result.pred_sem_seg.data[0].cpu().numpy()
            mask_path, vis_path = self.output_paths(path, root)
            mmcv.imwrite(mask.astype(self.mask_dtype), mask_path)
            mmcv.imwrite(overlay(image, mask, self.palette, self.opacity), vis_path)
            summary.outputs[path] = (mask_path, vis_path)

    def run(self, paths: Sequence[str], progress: bool = True) -> InferenceSummary:
        """Segment ``paths``; unreadable files are recorded in the summary and skipped."""
        summary = InferenceSummary()
        if not paths:
            return summary
        root = osp.commonpath([osp.dirname(osp.abspath(p)) for p in paths])
        with _progress(len(paths), enabled=progress) as update:
            for batch in _batches(paths, self.batch_size):
                readable = []
                for path in batch:
                    try:
                        image = mmcv.imread(path)
                    except Exception as error:  # noqa: BLE001  (missing file, permission, I/O error)
                        image, reason = None, repr(error)
                    else:
                        reason = 'not a readable image (corrupt or unsupported format)'
                    if image is None:
                        summary.failures[path] = reason
                    else:
                        readable.append((path, image))
                for group in _group_by_shape(readable):
                    self._segment(group, root, summary)
                update(len(batch))
        return summary


def segment_images(config: str,
                   checkpoint: Optional[str],
                   inputs: Sequence[str],
                   out_dir: str,
                   device: str = 'cpu',
                   opacity: float = 0.5,
                   batch_size: int = 1,
                   progress: bool = True) -> InferenceSummary:
    """Build the model of ``config`` with ``checkpoint`` and segment every image in ``inputs`` into ``out_dir``."""
    paths = collect_images(inputs)
    model = init_segmentor(config, checkpoint, device)
    return SegmentationWriter(model, out_dir, opacity=opacity, batch_size=batch_size).run(paths, progress=progress)
