"""Segment many images with a trained model: class-index masks and colour overlays, robust to bad files.

``mmseg.apis.inference_model`` segments images already in memory; this module adds what a user-facing tool needs
around it: expanding a file, folder or glob into images, batching, a progress bar, writing results, and reporting
unreadable files instead of aborting the whole run on the first one.

For every input ``<rel>`` (its path relative to the inputs' common folder, extension included, so that neither
equal names in different folders nor ``x.jpg`` and ``x.png`` of one folder collide) it writes

* ``<out_dir>/pred/<rel>.png``: the predicted class index of every pixel (the model's classes, 0-based; ``uint8``,
  or ``uint16`` for models with more than 256 classes), at the input's resolution;
* ``<out_dir>/vis/<rel>.png``: the input blended with the class colours of the model's palette.

The checkpoint is loaded under the package's policy (:mod:`mmseg_vil.utils.checkpoint`): one that does not fit the
config's model stops before any image is read.
"""
import os.path as osp
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mmcv
import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import revert_sync_batchnorm
from mmengine.utils import ProgressBar
from mmseg.apis import inference_model, init_model
from mmseg.registry import DATASETS
from torch import nn

from mmseg_vil_runtime.files import InferenceSummary, output_paths, overlay  # torch-free, shared with infer_onnx

from ..engine.checkpoint_policy import load_model_checkpoint
from ..engine.compile import compile_parts, take_compile_options
from ..utils.checkpoint import CheckpointMismatchError
from ..utils.config import read_model_config
from .batch_inputs import (check_fraction, check_inputs_outside_results, check_positive, collect_images, read_image,
                           resolve_device)


def _dataset_meta(meta: dict, config: Config, num_classes: int) -> dict:
    """Class names and palette: from the checkpoint (MMSeg 1.x ``dataset_meta``, 0.x ``CLASSES``/``PALETTE``), else
    from the config's test dataset when its class count matches the model's."""
    if 'dataset_meta' in meta:
        return meta['dataset_meta']
    if 'CLASSES' in meta:
        return dict(classes=meta['CLASSES'], palette=meta['PALETTE'])
    dataset_type = config.get('test_dataloader', {}).get('dataset', {}).get('type')
    metainfo = getattr(DATASETS.get(dataset_type), 'METAINFO', {}) if isinstance(dataset_type, str) else {}
    if len(metainfo.get('classes', ())) != num_classes or 'palette' not in metainfo:
        raise CheckpointMismatchError(
            f'the checkpoint records no class names and palette (dataset_meta), and the config\'s test dataset '
            f'{dataset_type} does not have the model\'s {num_classes} classes: use a config of its dataset')
    print_log(f'The checkpoint records no dataset_meta: using the classes and palette of {dataset_type}',
              logger='current')
    return dict(classes=metainfo['classes'], palette=metainfo['palette'])


def init_segmentor(config: Union[str, Config],
                   checkpoint: Optional[str],
                   device: Optional[str] = None,
                   cfg_options: Optional[dict] = None,
                   allow_partial: bool = False) -> nn.Module:
    """The segmentor of ``config`` holding ``checkpoint`` (loaded under the package's checkpoint policy).

    ``device`` defaults to CUDA when available. On CPU, SyncBN becomes BN as in MMSegmentation's demos: one process
    has no group to synchronise with, and some PyTorch versions reject CPU input to SyncBN. ``compile`` in the
    config (or ``cfg_options``) compiles the backbone and heads as in training (:mod:`mmseg_vil.engine.compile`):
    on CPU it fuses ViL's elementwise work; the first image of each new size is slow while it compiles.
    """
    device = resolve_device(device)
    config = read_model_config(config, 'segmentation') if not isinstance(config, Config) else config.copy()
    if cfg_options:
        config.merge_from_dict(cfg_options)
    compile_options = take_compile_options(config)
    model = init_model(config, None, device='cpu')  # also sets the default scope
    meta = load_model_checkpoint(model, checkpoint, allow_partial=allow_partial) if checkpoint is not None else {}
    model.dataset_meta = _dataset_meta(meta, config, model.decode_head.num_classes)
    model = model.to(device)
    if torch.device(device).type == 'cpu':
        model = revert_sync_batchnorm(model)
    if compile_options is not None:
        compile_parts(model, compile_options)
    return model


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
        self.model = model
        self.out_dir = out_dir
        self.opacity = check_fraction('opacity', opacity)
        self.batch_size = check_positive('batch_size', batch_size)
        self.palette = np.asarray(model.dataset_meta['palette'], np.uint8)
        self.mask_dtype = np.uint8 if len(self.palette) <= 256 else np.uint16

    def output_paths(self, path: str, root: str) -> Tuple[str, str]:
        """(mask, overlay) paths of input ``path``; the input's extension stays in the name, so none collide."""
        return output_paths(path, root, self.out_dir)

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
                    image, reason = read_image(path)
                    if image is None:
                        summary.failures[path] = reason
                    else:
                        readable.append((path, image))
                for group in _group_by_shape(readable):
                    self._segment(group, root, summary)
                update(len(batch))
        return summary


def segment_images(config: Union[str, Config],
                   checkpoint: Optional[str],
                   inputs: Sequence[str],
                   out_dir: str,
                   device: Optional[str] = None,
                   opacity: float = 0.5,
                   batch_size: int = 1,
                   progress: bool = True,
                   cfg_options: Optional[dict] = None,
                   allow_partial: bool = False) -> InferenceSummary:
    """Build the model of ``config`` with ``checkpoint`` and segment every image in ``inputs`` into ``out_dir``.

    The inputs and options are checked before the model is built; see :func:`init_segmentor` for the others.
    """
    check_fraction('opacity', opacity)
    check_positive('batch_size', batch_size)
    paths = collect_images(inputs)
    check_inputs_outside_results(paths, out_dir)
    model = init_segmentor(config, checkpoint, device, cfg_options=cfg_options, allow_partial=allow_partial)
    return SegmentationWriter(model, out_dir, opacity=opacity, batch_size=batch_size).run(paths, progress=progress)
