# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""The inputs of the batch tools (``tools/infer.py``, ``tools/classify.py``), checked before any model is loaded.

* :func:`collect_images` expands files, folders and globs; a pattern that names nothing is an error.
* :func:`read_image` reads one image or says, in words, why it cannot: a batch goes on past a bad file.
* :func:`resolve_device` picks CUDA when present and rejects a device that does not exist here.
* :func:`check_file`, :func:`check_positive` and :func:`check_fraction` validate options, naming the option.
"""
import glob
import os
import os.path as osp
from typing import List, Optional, Sequence, Tuple

import cv2
import mmcv
import numpy as np
import torch

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


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


def read_image(path: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """``(BGR image, None)``, or ``(None, reason)`` for a file that cannot be read or decoded."""
    try:
        with open(path, 'rb') as f:
            content = f.read()
    except OSError as error:
        return None, f'cannot be read ({error.strerror or error})'
    if not content:
        return None, 'empty file (0 bytes)'
    try:
        image = mmcv.imfrombytes(content)
    except cv2.error:
        image = None
    if image is None:
        return None, 'not a readable image (corrupt, truncated or an unsupported format)'
    return image, None


def resolve_device(device: Optional[str]) -> str:
    """``device``, or ``'cuda'`` when CUDA is available and ``'cpu'`` otherwise; a device that does not exist here
    raises ``ValueError``."""
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f'--device {device!r} is not a device name such as cpu, cuda, cuda:1') from error
    if parsed.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {device}: CUDA is not available here; use --device cpu')
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f'--device {device}: only {torch.cuda.device_count()} CUDA device(s) here')
    return device


def check_file(name: str, path: str) -> str:
    if not osp.isfile(path):
        raise ValueError(f'{name} {path}: no such file')
    return path


def check_positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f'{name} must be at least 1, got {value}')
    return value


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be in [0, 1], got {value}')
    return value
