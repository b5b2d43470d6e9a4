# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""A small, learnable stand-in for ImageNet-1K in its class-folder layout, for tests and smoke runs.

``root/{train,val}/<class>/<class>_<index>.JPEG`` is what MMPretrain's ``ImageNet`` (and ``CustomDataset``) read
without annotation files. Every image shows one class in the class's fixed colour and texture
(:func:`~mmseg_vil.datasets.synthetic_scenes.render_class`, with per-image jitter), so classes stay distinguishable
after greyscale, blur or colour jitter and a tiny model learns them in a few iterations.
Folder names look like WordNet ids (``n00000000`` ...), which is what real ImageNet folders are called.
"""
import os.path as osp
from typing import Tuple

import cv2
import numpy as np
from mmengine.utils import mkdir_or_exist

from .synthetic_scenes import class_appearance, render_class

SPLITS = ('train', 'val')


def generate_imagenet(root: str,
                      num_classes: int = 4,
                      train_per_class: int = 16,
                      val_per_class: int = 4,
                      size: Tuple[int, int] = (48, 48),
                      seed: int = 0) -> Tuple[str, ...]:
    """Write the folders under ``root`` and return the class (folder) names in label order.

    Args:
        root: output folder.
        num_classes: number of class folders.
        train_per_class, val_per_class: images per class in ``train`` and ``val``.
        size: ``(height, width)`` of every image.
        seed: the output is a function of the arguments only (each image has its own seeded generator).
    """
    classes = tuple(f'n{index:08d}' for index in range(num_classes))
    shape = (int(size[0]), int(size[1]))
    counts = dict(zip(SPLITS, (train_per_class, val_per_class)))
    for split_id, (split, count) in enumerate(counts.items()):
        for label, name in enumerate(classes):
            appearance = class_appearance(label, num_classes)
            mkdir_or_exist(osp.join(root, split, name))
            for index in range(count):
                image = render_class(appearance, shape, np.random.default_rng([seed, split_id, label, index]))
                cv2.imwrite(osp.join(root, split, name, f'{name}_{index:04d}.JPEG'), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
    return classes
