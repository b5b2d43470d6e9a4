# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""A small, learnable stand-in for ADE20K, written in the exact ``ADEChallengeData2016`` layout.

The scenes are :mod:`.synthetic_scenes`'; what is ADE20K here is the file layout, the names, JPEG images and
``uint8`` PNG labels with 0 = "other" and 1..150 = ADE classes, so ``ADE20KDataset`` with ``reduce_zero_label=True``
reads them unchanged. Class ``k`` (1-based) of the used subset is ADE class ``k``.
"""
import os.path as osp
from typing import Dict, Tuple

import cv2
import numpy as np

from .synthetic_scenes import save_image, write_scenes

ADE_NUM_CLASSES = 150
SPLITS = {'training': 'ADE_train', 'validation': 'ADE_val'}


def sample_paths(root: str, split: str, index: int) -> Tuple[str, str]:
    """``(image, annotation)`` paths of the ``index``-th (0-based) sample, named as in ADEChallengeData2016."""
    stem = f'{SPLITS[split]}_{index + 1:08d}'
    return (osp.join(root, 'images', split, stem + '.jpg'), osp.join(root, 'annotations', split, stem + '.png'))


def generate_ade20k(root: str,
                    num_train: int = 400,
                    num_val: int = 50,
                    size: Tuple[int, int] = (128, 128),
                    num_classes: int = 8,
                    seed: int = 0,
                    log_every: int = 500) -> Dict[str, int]:
    """Write a synthetic ADE20K to ``root`` (the ``ADEChallengeData2016`` folder) and return images per split.

    Args:
        root: output folder; ``images/{training,validation}`` and ``annotations/{training,validation}`` are created.
        num_train, num_val: number of training and validation samples.
        size: ``(height, width)`` of every image.
        num_classes: how many ADE classes appear (classes 1..num_classes); at most 150.
        seed: the output is a function of the arguments only.
        log_every: log progress every this many images of a split.
    """

    def write_sample(split: str, index: int, image: np.ndarray, label: np.ndarray) -> None:
        img_path, ann_path = sample_paths(root, split, index)
        save_image(img_path, image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        save_image(ann_path, label)  # scene labels are ADE's: 0 = other, k = class k

    return write_scenes({'training': num_train, 'validation': num_val}, size, num_classes, ADE_NUM_CLASSES, seed,
                        write_sample, f'synthetic ADE20K in {root}', log_every)
