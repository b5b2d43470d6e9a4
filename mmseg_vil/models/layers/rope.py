"""2-D rotary position embedding of Vision Mamba (``if_rope``; EVA-02's ``VisionRotaryEmbeddingFast``).

The first half of the channels rotates with the patch row, the second half with the patch column; the angles of
position ``i`` on a side of ``n`` patches are ``(i / n * pt_grid) / theta ** (2k / (D / 2))``, consecutive channel
pairs sharing one angle. The official tables are fixed at build time for a square grid of
``img_size // patch_size``; computing them for the actual ``(h, w)`` grid gives the same tables there and extends
them to any grid.
"""
from typing import Tuple

import torch
from torch import Tensor


def rope_tables(grid: Tuple[int, int], dims: int, pt_grid: int, theta: float = 10000.0) -> Tuple[Tensor, Tensor]:
    """``(cos, sin)`` of shape ``(h * w, dims)`` for the row-major patches of ``grid``; ``dims`` divisible by 4."""
    half = dims // 2
    freqs = 1.0 / (theta**(torch.arange(0, half, 2)[:half // 2].float() / half))

    def side_angles(length: int) -> Tensor:
        positions = torch.arange(length) / length * pt_grid
        return (positions[:, None] * freqs).repeat_interleave(2, dim=-1)  # (length, half)

    height, width = grid
    rows = side_angles(height)[:, None].expand(height, width, half)
    cols = side_angles(width)[None].expand(height, width, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(height * width, dims)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: each channel pair turned by 90 degrees."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last ``len(cos)`` tokens of ``x (B, L, D)``; leading extra tokens stay as they are.

    The official code rotates ``x[:, 1:]`` when ``L`` is odd and all of ``x`` otherwise, which is this whenever it
    runs (``L`` is the number of patches, or one more).
    """
    num_extra = x.shape[1] - cos.shape[0]
    rotated = x[:, num_extra:] * cos + rotate_half(x[:, num_extra:]) * sin
    return torch.cat([x[:, :num_extra], rotated], dim=1) if num_extra else rotated
