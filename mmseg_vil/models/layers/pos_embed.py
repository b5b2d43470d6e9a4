"""Resampling of 2-D position-embedding grids, shared by load-time hooks and run-time interpolation."""
from typing import Tuple

import torch.nn.functional as F
from torch import Tensor


def resample_grid_pos_embed(pos_embed: Tensor, grid: Tuple[int, int], mode: str = 'bicubic') -> Tensor:
    """Resample a channels-last grid embedding ``(1, h, w, D)`` to ``(1, *grid, D)``.

    Bicubic with ``align_corners=False`` in float32 is the official Vision-LSTM interpolation (vil_spec.md §2.2);
    the input is returned unchanged when the grid already matches.
    """
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=tuple(grid), mode=mode, align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)
