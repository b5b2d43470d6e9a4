# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""A small, learnable stand-in for Cityscapes, written in the layout MMSegmentation's ``CityscapesDataset`` reads.

That layout is the official one after mmseg's ``tools/dataset_converters/cityscapes.py`` has added the train-id
labels: ``leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` images and, beside them under
``gtFine``, ``..._gtFine_labelTrainIds.png`` labels (``uint8``, train ids 0..18, 255 ignored). The dataset pairs the
two by replacing one suffix with the other, so the names and city folders must match exactly.

The scenes are :mod:`.synthetic_scenes`': scene class ``k`` (1-based) becomes train id ``k - 1``, "other" becomes 255.
Images are numbered per split and dealt to the split's cities in turn (real city names of that split).
"""
import os.path as osp
from typing import Dict, Tuple

import numpy as np

from .synthetic_scenes import OTHER_LABEL, save_image, write_scenes

CITYSCAPES_NUM_CLASSES = 19
IGNORE_INDEX = 255
IMG_SUFFIX = '_leftImg8bit.png'
SEG_MAP_SUFFIX = '_gtFine_labelTrainIds.png'
SPLIT_CITIES = {'train': ('aachen', 'bremen', 'zurich'), 'val': ('frankfurt', 'lindau', 'munster')}
FRAME = 19  # the annotated frame of every fine-annotated Cityscapes sequence


def sample_paths(root: str, split: str, index: int) -> Tuple[str, str]:
    """``(image, label)`` paths of the ``index``-th (0-based) sample of ``split``, named as in Cityscapes."""
    cities = SPLIT_CITIES[split]
    city = cities[index % len(cities)]
    stem = f'{city}_{index // len(cities):06d}_{FRAME:06d}'
    return (osp.join(root, 'leftImg8bit', split, city, stem + IMG_SUFFIX),
            osp.join(root, 'gtFine', split, city, stem + SEG_MAP_SUFFIX))


def to_train_ids(scene_label: np.ndarray) -> np.ndarray:
    """Scene labels (0 other, 1..N) as Cityscapes train ids (255 ignored, 0..N-1)."""
    return np.where(scene_label == OTHER_LABEL, IGNORE_INDEX, scene_label.astype(np.int64) - 1).astype(np.uint8)


def generate_cityscapes(root: str,
                        num_train: int = 300,
                        num_val: int = 50,
                        size: Tuple[int, int] = (128, 256),
                        num_classes: int = 8,
                        seed: int = 0,
                        log_every: int = 500) -> Dict[str, int]:
    """Write a synthetic Cityscapes to ``root`` (the ``data/cityscapes`` folder) and return images per split.

    Args:
        root: output folder; ``leftImg8bit/{train,val}/<city>`` and ``gtFine/{train,val}/<city>`` are created.
        num_train, num_val: number of training and validation samples.
        size: ``(height, width)`` of every image; real Cityscapes frames are 1024x2048 (1:2).
        num_classes: how many classes appear (train ids 0..num_classes-1); at most 19.
        seed: the output is a function of the arguments only.
        log_every: log progress every this many images of a split.
    """

    def write_sample(split: str, index: int, image: np.ndarray, label: np.ndarray) -> None:
        img_path, label_path = sample_paths(root, split, index)
        save_image(img_path, image)
        save_image(label_path, to_train_ids(label))

    return write_scenes({'train': num_train, 'val': num_val}, size, num_classes, CITYSCAPES_NUM_CLASSES, seed,
                        write_sample, f'synthetic Cityscapes in {root}', log_every)
