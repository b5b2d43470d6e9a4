# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Learnable synthetic scenes, shared by the ADE20K- and Cityscapes-layout stand-ins and the ImageNet one.

The real datasets are large and take GPU-days to learn; the embedded demo and the tests must train tiny models on two
CPU cores in minutes and still see a meaningful mIoU. So the scenes keep what matters to the pipeline and replace the
content by something a tiny model can learn:

* every image is a background class plus a few random polygons and ellipses of other classes, and sometimes an
  "other" region (ignored in training and evaluation) of grey noise;
* every class has a fixed appearance: a hue plus one of four textures (stripes, checker, dots, grain) with a
  class-dependent orientation and period. Per image the brightness, hue and texture phase are jittered, so a model
  has to use colour *and* texture rather than memorise pixel values.

Labels are 0 for "other" and 1..N for the classes; each dataset layout maps them to its own label values and writes
the files (:mod:`.synthetic_ade20k`, :mod:`.synthetic_cityscapes`). Every image is drawn from its own generator seeded
by ``(seed, split, index)``, so the output depends only on the arguments.
"""
import math
import os.path as osp
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import cv2
import numpy as np
from mmengine.logging import print_log
from mmengine.utils import mkdir_or_exist

TEXTURES = ('stripes', 'checker', 'dots', 'grain')
OTHER_LABEL = 0
# Receives (split, index, image, label) of every scene and writes it in a dataset's layout.
SampleWriter = Callable[[str, int, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class ClassAppearance:
    """How pixels of one class look: an HSV colour and a texture that modulates its brightness."""

    hue: float  # OpenCV hue, 0..180
    saturation: float  # 0..255
    texture: str  # one of TEXTURES
    angle: float  # texture orientation in degrees
    period: float  # texture period in pixels
    contrast: float  # amplitude of the brightness modulation, 0..1


def class_appearance(index: int, num_classes: int) -> ClassAppearance:
    """The appearance of the ``index``-th (0-based) used class: hues evenly spread, textures cycled.

    Neighbouring classes differ in hue, texture kind and orientation at once, so each cue alone separates most pairs.
    """
    return ClassAppearance(
        hue=180.0 * index / num_classes,
        saturation=150.0 + 80.0 * (index % 2),
        texture=TEXTURES[index % len(TEXTURES)],
        angle=(index * 47.0) % 180.0,
        period=5.0 + 3.0 * (index % 3),
        contrast=0.35 + 0.1 * (index % 3))


def _texture(appearance: ClassAppearance, shape: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A ``(H, W)`` pattern in [0, 1] with a random phase (and, for grain, random content)."""
    h, w = shape
    if appearance.texture == 'grain':
        grain = rng.standard_normal((h, w)).astype(np.float32)
        grain = cv2.GaussianBlur(grain, (0, 0), sigmaX=appearance.period / 4)
        return np.clip(0.5 + grain / (4 * grain.std() + 1e-6), 0.0, 1.0)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = math.radians(appearance.angle)
    u = xs * math.cos(theta) + ys * math.sin(theta) + rng.uniform(0, appearance.period)
    v = -xs * math.sin(theta) + ys * math.cos(theta) + rng.uniform(0, appearance.period)
    p = appearance.period
    if appearance.texture == 'stripes':
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / p)
    if appearance.texture == 'checker':
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    # dots: bright discs on a lattice
    du = (u % p) - p / 2
    dv = (v % p) - p / 2
    return (du * du + dv * dv < (p / 3) ** 2).astype(np.float32)


def render_class(appearance: ClassAppearance, shape: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A full ``(H, W, 3)`` BGR ``uint8`` image of one class, with per-image colour jitter and sensor noise."""
    hue = (appearance.hue + rng.uniform(-3, 3)) % 180
    value = 200.0 * rng.uniform(0.8, 1.1)
    pattern = _texture(appearance, shape, rng)
    hsv = np.empty((*shape, 3), np.float32)
    hsv[..., 0] = hue
    hsv[..., 1] = appearance.saturation
    hsv[..., 2] = value * (1 - appearance.contrast + appearance.contrast * pattern)
    bgr = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    bgr += rng.normal(0, 6, bgr.shape)
    return np.clip(bgr, 0, 255).astype(np.uint8)


def _random_region(shape: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of a random star-shaped polygon or ellipse covering roughly 3-40% of the image."""
    h, w = shape
    mask = np.zeros(shape, np.uint8)
    centre = (int(rng.uniform(0.1, 0.9) * w), int(rng.uniform(0.1, 0.9) * h))
    scale = min(h, w) * rng.uniform(0.15, 0.4)
    if rng.random() < 0.5:
        axes = (int(scale * rng.uniform(0.5, 1.2)), int(scale * rng.uniform(0.5, 1.2)))
        cv2.ellipse(mask, centre, axes, rng.uniform(0, 180), 0, 360, 1, thickness=-1)
    else:
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = scale * rng.uniform(0.5, 1.3, n)
        points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [points.round().astype(np.int32)], 1)
    return mask.astype(bool)


def generate_sample(appearances: Sequence[ClassAppearance], shape: Tuple[int, int],
                    rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: ``(image BGR uint8 (H, W, 3), label uint8 (H, W))`` with labels 0 (other) and 1..len(appearances).

    Later regions occlude earlier ones, as objects do in a photo.
    """
    num_classes = len(appearances)
    label = np.full(shape, rng.integers(1, num_classes + 1), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        label[_random_region(shape, rng)] = rng.integers(1, num_classes + 1)
    if rng.random() < 0.3:
        label[_random_region(shape, rng)] = OTHER_LABEL
    image = np.zeros((*shape, 3), np.uint8)
    for cls in np.unique(label):
        region = label == cls
        if cls == OTHER_LABEL:
            image[region] = rng.integers(40, 216, (int(region.sum()), 1), dtype=np.uint8)
        else:
            image[region] = render_class(appearances[cls - 1], shape, rng)[region]
    return image, label


def save_image(path: str, image: np.ndarray, params: Sequence[int] = ()) -> None:
    """Write ``image`` to ``path`` (format from the extension), creating its folder; raise if OpenCV cannot."""
    mkdir_or_exist(osp.dirname(path))
    if not cv2.imwrite(path, image, list(params)):
        raise OSError(f'OpenCV could not write {path}: check that the path names a writable file (not a folder) on '
                      'a disk with free space')


def write_scenes(counts: Dict[str, int],
                 size: Tuple[int, int],
                 num_classes: int,
                 max_classes: int,
                 seed: int,
                 write_sample: SampleWriter,
                 description: str,
                 log_every: int = 500) -> Dict[str, int]:
    """Synthesise ``counts[split]`` scenes per split and hand each to ``write_sample``; return the counts.

    Args:
        counts: images per split, in the order that seeds them (a split's position is part of every image's seed).
        size: ``(height, width)`` of every image.
        num_classes: how many classes appear (scene labels 1..num_classes); at most ``max_classes``.
        max_classes: the dataset's number of classes.
        seed: the output is a function of the arguments only.
        write_sample: writes one scene in the dataset's layout.
        description: names the dataset and folder in the progress log.
        log_every: log progress every this many images of a split.
    """
    if not 1 <= num_classes <= max_classes:
        raise ValueError(f'num_classes must be in 1..{max_classes}, got {num_classes}')
    for what, values in (('images per split', counts.values()), ('size', size)):
        if min(values) < 1:
            raise ValueError(f'{what} must be at least 1, got {list(values)}')
    shape = (int(size[0]), int(size[1]))
    appearances = [class_appearance(i, num_classes) for i in range(num_classes)]
    for split_id, (split, count) in enumerate(counts.items()):
        for index in range(count):
            image, label = generate_sample(appearances, shape, np.random.default_rng([seed, split_id, index]))
            write_sample(split, index, image, label)
            if (index + 1) % log_every == 0 or index + 1 == count:
                print_log(f'{description} {split}: {index + 1}/{count} images written', logger='current')
    return dict(counts)
