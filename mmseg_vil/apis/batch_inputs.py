# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""The inputs of the batch tools (``tools/infer.py``, ``tools/classify.py``), checked before any model is loaded.

* :func:`collect_images` expands files, folders and globs; a pattern that names nothing is an error, and
  :func:`check_inputs_outside_results` refuses inputs where the results go.
* :func:`read_image` reads one image or says, in words, why it cannot: a batch goes on past a bad file.
  (Both live in :mod:`mmseg_vil_runtime.files`, without PyTorch, so that the ONNX Runtime tool shares them.)
* :func:`resolve_device` picks CUDA when present and rejects a device that does not exist here.
* :func:`check_file`, :func:`check_out_dir`, :func:`check_positive` and :func:`check_fraction` validate options, naming
  the option.
"""
import os.path as osp
from typing import Optional

import torch

from mmseg_vil_runtime.files import (  # noqa: F401  (torch-free, shared)
    IMAGE_EXTENSIONS, check_inputs_outside_results, collect_images, read_image)


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


def check_out_dir(name: str, path: str) -> str:
    """An output folder may exist (results are added to it) but must not be a file, found before any work."""
    if osp.exists(path) and not osp.isdir(path):
        raise ValueError(f'{name} {path} is a file, not a folder')
    return path


def check_positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f'{name} must be at least 1, got {value}')
    return value


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be in [0, 1], got {value}')
    return value
