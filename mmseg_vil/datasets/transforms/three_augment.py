# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""3-Augment (Touvron et al., DeiT III): each training image gets exactly one of greyscale, solarize or blur.

The Vision-LSTM recipe applies it after the random resized crop and flip and before a ColorJitter(0.3, 0.3, 0.3)
(vil_spec.md §4). MMPretrain has the three operations only as independent, separately gated transforms, so the
"exactly one, chosen uniformly" semantics of the recipe needs its own transform.
"""
from typing import Sequence, Tuple

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmcv.transforms.utils import cache_randomness
from PIL import Image, ImageFilter

try:
    from mmpretrain.registry import TRANSFORMS
except ImportError as err:  # pragma: no cover - mmpretrain is the optional "cls" extra
    raise ImportError('ThreeAugment needs mmpretrain (pip install mmseg-vil[cls])') from err

OPERATIONS = ('greyscale', 'solarize', 'blur')


@TRANSFORMS.register_module()
class ThreeAugment(BaseTransform):
    """Apply one of greyscale, solarize or Gaussian blur, chosen uniformly at random, to ``results['img']``.

    * greyscale: ITU-R 601 luma, replicated to three channels so later transforms still see a colour image;
    * solarize: invert every channel value at or above ``solarize_threshold`` (PIL's and mmcv's convention);
    * blur: PIL Gaussian blur with a radius drawn uniformly from ``blur_sigma`` (as the official training code).

    Args:
        blur_sigma: ``(min, max)`` of the blur radius in pixels.
        solarize_threshold: values ``>=`` this are inverted.
        color_format: channel order of the ``uint8`` ``(H, W, 3)`` input, ``'bgr'`` (what MMPretrain's
            ``LoadImageFromFile`` produces) or ``'rgb'``; only the greyscale weights depend on it.
    """

    def __init__(self, blur_sigma: Sequence[float] = (0.1, 2.0), solarize_threshold: int = 128,
                 color_format: str = 'bgr') -> None:
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f'blur_sigma must be (min, max) with 0 < min <= max, got {blur_sigma}')
        if color_format not in ('bgr', 'rgb'):
            raise ValueError(f"color_format must be 'bgr' or 'rgb', got {color_format!r}")
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.solarize_threshold = solarize_threshold
        self.color_format = color_format

    @cache_randomness
    def _draw(self) -> Tuple[str, float]:
        """The operation and the blur radius (drawn every time, so the random stream is independent of the choice)."""
        return OPERATIONS[np.random.randint(len(OPERATIONS))], float(np.random.uniform(*self.blur_sigma))

    def transform(self, results: dict) -> dict:
        img = results['img']
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f'ThreeAugment expects a uint8 (H, W, 3) image, got {img.dtype} {img.shape}')
        operation, sigma = self._draw()
        if operation == 'greyscale':
            to_grey = mmcv.bgr2gray if self.color_format == 'bgr' else mmcv.rgb2gray
            img = np.repeat(to_grey(img, keepdim=True), 3, axis=2)
        elif operation == 'solarize':
            img = mmcv.solarize(img, thr=self.solarize_threshold)
        else:
            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma)))
        results['img'] = img
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(blur_sigma={self.blur_sigma}, '
                f'solarize_threshold={self.solarize_threshold}, color_format={self.color_format!r})')
