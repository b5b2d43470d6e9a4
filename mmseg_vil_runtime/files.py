"""Image files in, masks and overlays out: the file handling shared by ``tools/infer.py`` and ``infer_onnx.py``.

Torch-free, so that both the PyTorch tools (:mod:`mmseg_vil.apis`, which import it from here) and the ONNX Runtime
tool use the same input expansion, image decoding, failure reasons and output layout. For every input ``<rel>`` (its
path relative to the inputs' common folder, extension included, so that neither equal names in different folders
nor ``x.jpg`` and ``x.png`` of one folder collide) the tools write ``<out_dir>/pred/<rel>.png`` (class indices) and
``<out_dir>/vis/<rel>.png`` (overlay).
"""
import glob
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

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
    silently ignored; a folder without images is an error, as is a glob that matches nothing.
    """
    paths = []
    for item in inputs:
        if osp.isdir(item):
            found = [osp.join(folder, n) for folder, _, names in os.walk(item)
                     for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise FileNotFoundError(f'{item!r} is a folder without images ({", ".join(IMAGE_EXTENSIONS)})')
            paths += found
        elif osp.isfile(item):
            paths.append(item)
        else:
            matches = [p for p in glob.glob(item, recursive=True) if osp.isfile(p)]
            if not matches:
                raise FileNotFoundError(f'{item!r} is neither a file, a folder nor a glob matching any file')
            paths += matches
    return sorted(set(osp.normpath(p) for p in paths))


def check_inputs_outside_results(paths: Sequence[str], out_dir: str) -> None:
    """Refuse inputs inside ``out_dir``'s ``pred``/``vis`` folders: a result written there could replace an input, and
    an earlier run's results would be segmented again as inputs (when ``out_dir`` is an input folder)."""
    result_dirs = [osp.abspath(osp.join(out_dir, name)) for name in ('pred', 'vis')]
    for path in paths:
        for folder in result_dirs:
            if osp.commonpath([osp.abspath(path), folder]) == folder:
                raise ValueError(f'input {path} is inside {folder}, where the results are written (an earlier '
                                 'run\'s?): write them to another out dir, or leave that folder out of the inputs')


def read_image(path: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """``(BGR image, None)``, or ``(None, reason)`` for a file that cannot be read or decoded.

    Decodes as ``mmcv.imread`` does with its default OpenCV backend (``cv2.IMREAD_COLOR``).
    """
    try:
        with open(path, 'rb') as f:
            content = f.read()
    except OSError as error:
        return None, f'cannot be read ({error.strerror or error})'
    if not content:
        return None, 'empty file (0 bytes)'
    try:
        image = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        return None, 'not a readable image (corrupt, truncated or an unsupported format)'
    return image, None


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """Blend a BGR image with the RGB ``palette`` colour of each pixel's class."""
    colours = palette[mask][..., ::-1].astype(np.float32)
    return np.clip((1 - opacity) * image + opacity * colours, 0, 255).astype(np.uint8)


def output_paths(path: str, root: str, out_dir: str) -> Tuple[str, str]:
    """(mask, overlay) paths of input ``path`` below ``root``; the input's extension stays in the name."""
    name = osp.relpath(osp.abspath(path), root) + '.png'
    return osp.join(out_dir, 'pred', name), osp.join(out_dir, 'vis', name)


def write_image(path: str, image: np.ndarray) -> None:
    """Write an image, creating its folder; raise ``OSError`` if OpenCV cannot write it."""
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    if not cv2.imwrite(path, image):
        raise OSError(f'could not write {path}')
