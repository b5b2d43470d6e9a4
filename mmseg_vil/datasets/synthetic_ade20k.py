"""A small, learnable stand-in for ADE20K, written in the exact ``ADEChallengeData2016`` layout.

The real dataset is 1 GB and takes GPU-days to learn; the embedded demo must train three models on two CPU cores in
minutes and still show a meaningful mIoU. So the synthetic images keep what matters to the pipeline (file layout,
names, JPEG images, ``uint8`` PNG labels with 0 = "other" and 1..150 = ADE classes, so ``ADE20KDataset`` with
``reduce_zero_label=True`` reads them unchanged) and replace the content by scenes a tiny model can learn:

* every image is a background class plus a few random polygons and ellipses of other classes, and sometimes an
  "other" region (label 0, ignored in training and evaluation) of grey noise;
* every class has a fixed appearance: a hue plus one of four textures (stripes, checker, dots, grain) with a
  class-dependent orientation and period. Per image the brightness, hue and texture phase are jittered, so a model
  has to use colour *and* texture rather than memorise pixel values.

Class ``k`` (1-based) of the used subset is ADE class ``k``; ``num_classes`` chooses how many are used. Every image
is drawn from its own generator seeded by ``(seed, split, index)``, so the output depends only on the arguments.
"""
import math
import os.path as osp
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import cv2
import numpy as np
from mmengine.logging import print_log
from mmengine.utils import mkdir_or_exist

ADE_NUM_CLASSES = 150
TEXTURES = ('stripes', 'checker', 'dots', 'grain')
SPLITS = {'training': 'ADE_train', 'validation': 'ADE_val'}
OTHER_LABEL = 0


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
    if not 1 <= num_classes <= ADE_NUM_CLASSES:
        raise ValueError(f'num_classes must be in 1..{ADE_NUM_CLASSES}, got {num_classes}')
    shape = (int(size[0]), int(size[1]))
    appearances = [class_appearance(i, num_classes) for i in range(num_classes)]
    counts = {'training': num_train, 'validation': num_val}
    for split_id, (split, count) in enumerate(counts.items()):
        mkdir_or_exist(osp.join(root, 'images', split))
        mkdir_or_exist(osp.join(root, 'annotations', split))
        for index in range(count):
            image, label = generate_sample(appearances, shape, np.random.default_rng([seed, split_id, index]))
            img_path, ann_path = sample_paths(root, split, index)
            cv2.imwrite(img_path, image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(ann_path, label)
            if (index + 1) % log_every == 0 or index + 1 == count:
                print_log(f'synthetic ADE20K {split}: {index + 1}/{count} images written to {root}', logger='current')
    return counts
