"""Image files in, masks and overlays out: the file handling of ``tools/infer.py`` without PyTorch or MMCV.

Inputs are expanded and named, images decoded and results written exactly as :mod:`mmseg_vil.apis.inference`
does (OpenCV, BGR, the same output layout), so ``tools/deploy/infer_onnx.py`` and ``tools/infer.py`` produce the same
files for the same model. An unreadable file is recorded with its reason and skipped.
"""
import glob
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
UNREADABLE = 'not a readable image (corrupt or unsupported format)'


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
    """Sorted image paths of files, folders (recursively, image extensions only) and glob patterns.

    A file named explicitly is kept whatever its extension, so that a bad file is reported, not ignored; an input
    that names nothing raises ``FileNotFoundError``.
    """
    found = set()
    for item in inputs:
        if osp.isfile(item):
            found.add(item)
        elif osp.isdir(item):
            found.update(osp.join(folder, name) for folder, _, names in os.walk(item) for name in names
                         if name.lower().endswith(IMAGE_EXTENSIONS))
        else:
            matches = [path for path in glob.glob(item, recursive=True) if osp.isfile(path)]
            if not matches:
                raise FileNotFoundError(f'{item!r} is neither a file, a folder nor a glob matching any file')
            found.update(matches)
    return sorted({osp.normpath(path) for path in found})


def read_image(path: str) -> Tuple[Optional[np.ndarray], str]:
    """``(BGR image, '')``, or ``(None, reason)`` for a file that cannot be read or decoded."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as error:
        return None, repr(error)
    if data.size == 0:
        return None, 'empty file (0 bytes)'
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return (None, UNREADABLE) if image is None else (image, '')


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """Blend a BGR image with the RGB ``palette`` colour of each pixel's class."""
    colours = palette[mask][..., ::-1].astype(np.float32)
    return np.clip((1 - opacity) * image + opacity * colours, 0, 255).astype(np.uint8)


def output_paths(path: str, root: str, out_dir: str) -> Tuple[str, str]:
    """``(out_dir/pred/<rel>.png, out_dir/vis/<rel>.png)`` with ``rel`` the path relative to ``root``."""
    stem = osp.splitext(osp.relpath(osp.abspath(path), root))[0]
    return osp.join(out_dir, 'pred', stem + '.png'), osp.join(out_dir, 'vis', stem + '.png')


def write_image(path: str, image: np.ndarray) -> None:
    """Write a PNG, creating its folder; raise ``OSError`` if OpenCV cannot write it."""
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    if not cv2.imwrite(path, image):
        raise OSError(f'could not write {path}')
