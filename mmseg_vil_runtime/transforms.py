"""MMSegmentation's test-time pre- and post-processing in NumPy and OpenCV.

Each function reproduces one step of ``mmseg.apis.inference_model`` with the same arithmetic, so an exported graph
gets the same input tensor as the PyTorch model and its logits become the same mask:

* :func:`resize_image`: MMCV's ``Resize`` transform (size rule and OpenCV interpolation);
* :func:`normalise`: ``SegDataPreProcessor`` (BGR -> RGB, ``(x - mean) / std`` in float32);
* :func:`slide_windows`: ``EncoderDecoder.slide_inference``'s crops;
* :func:`resize_logits`: PyTorch's bilinear ``F.interpolate`` (``antialias=False``), which MMSegmentation applies to
  the logits to return to the image's size before the arg-max.
"""
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from .metadata import ResizeSpec

CV2_INTERPOLATIONS = {
    'nearest': cv2.INTER_NEAREST,
    'bilinear': cv2.INTER_LINEAR,
    'bicubic': cv2.INTER_CUBIC,
    'area': cv2.INTER_AREA,
    'lanczos': cv2.INTER_LANCZOS4,
}


def _round_size(width: float, height: float) -> Tuple[int, int]:
    return int(width + 0.5), int(height + 0.5)


def resized_size(height: int, width: int, spec: ResizeSpec) -> Tuple[int, int]:
    """``(h, w)`` that MMCV's ``Resize`` gives an image of ``height`` x ``width``."""
    if spec.scale is not None:
        target_w, target_h = spec.scale
    else:
        target_w, target_h = _round_size(width * float(spec.scale_factor[0]), height * float(spec.scale_factor[1]))
    if not spec.keep_ratio:
        return target_h, target_w
    # Largest size whose long side fits the long target and short side the short target (mmcv.rescale_size).
    factor = min(max(target_w, target_h) / max(height, width), min(target_w, target_h) / min(height, width))
    new_w, new_h = _round_size(width * float(factor), height * float(factor))
    return new_h, new_w


def resize_image(image: np.ndarray, spec: Optional[ResizeSpec]) -> np.ndarray:
    """The test pipeline's resize of a BGR ``uint8`` image (unchanged without one)."""
    if spec is None:
        return image
    height, width = resized_size(*image.shape[:2], spec)
    return cv2.resize(image, (width, height), interpolation=CV2_INTERPOLATIONS[spec.interpolation])


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float], bgr_to_rgb: bool) -> np.ndarray:
    """``(H, W, 3)`` image -> ``(1, 3, H, W)`` float32 model input."""
    if bgr_to_rgb:
        image = image[..., ::-1]
    channels = image.transpose(2, 0, 1).astype(np.float32)
    mean32 = np.asarray(mean, np.float32)[:, None, None]
    std32 = np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray(((channels - mean32) / std32)[None])


def slide_windows(height: int, width: int, crop: Sequence[int],
                  stride: Sequence[int]) -> Iterator[Tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` of every window, in MMSegmentation's order; windows larger than the image shrink."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            yield max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2


def _linear_taps(in_size: int, out_size: int, align_corners: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0, i1`` and weight ``w1`` of each output position, as PyTorch computes them (float32)."""
    out_index = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        source = scale * out_index
    else:
        scale = np.float32(in_size) / np.float32(out_size)
        source = np.maximum(scale * (out_index + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    w1 = np.clip(source - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, w1


def resize_logits(logits: np.ndarray, size: Tuple[int, int], align_corners: bool) -> np.ndarray:
    """Bilinear resize of ``(C, h, w)`` logits to ``size = (H, W)`` with PyTorch's indices and weights."""
    rows0, rows1, row_w1 = _linear_taps(logits.shape[1], size[0], align_corners)
    cols0, cols1, col_w1 = _linear_taps(logits.shape[2], size[1], align_corners)

    def along_width(rows: np.ndarray) -> np.ndarray:
        return rows[:, :, cols0] * (1 - col_w1) + rows[:, :, cols1] * col_w1

    row_w1 = row_w1[:, None]
    return along_width(logits[:, rows0]) * (1 - row_w1) + along_width(logits[:, rows1]) * row_w1
