"""Argument and input handling shared by the isotropic patch backbones (ViL, Vim)."""
from typing import Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor


def resolve_out_indices(out_indices: Union[int, Sequence[int]], num_layers: int, unit: str) -> Tuple[int, ...]:
    """Sorted, non-negative, de-duplicated layer indices; negative ones count from the end."""
    indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
    if not indices:
        raise ValueError('out_indices must name at least one layer')
    for index in indices:
        if not -num_layers <= index < num_layers:
            raise ValueError(f'out_indices {indices} invalid: out index {index} must lie in '
                             f'[{-num_layers}, {num_layers - 1}], i.e. from {-num_layers} to {num_layers - 1}, '
                             f'for {num_layers} {unit}')
    return tuple(sorted({index % num_layers for index in indices}))


def pad_to_patches(x: Tensor, in_channels: int, patch_size: int, model: str, stride: Optional[int] = None) -> Tensor:
    """Check a ``(B, C, H, W)`` batch and zero-pad its right and bottom so that patches cover it exactly.

    With ``stride`` (default ``patch_size``) the patches start every ``stride`` pixels: the padded size ``S``
    satisfies ``(S - patch_size) % stride == 0``, which leaves unpadded every size the official models accept.
    """
    if x.dim() != 4:
        raise ValueError(f'{model} expects a 4-D (B, C, H, W) image batch, got {x.dim()}-D with shape '
                         f'{tuple(x.shape)}')
    if x.shape[1] != in_channels:
        raise ValueError(f'{model} was built for in_channels={in_channels}, got {x.shape[1]} channels '
                         f'(input shape {tuple(x.shape)}); set in_channels accordingly')
    height, width = x.shape[-2:]
    if min(height, width) < patch_size:
        raise ValueError(f'input size {height}x{width} is smaller than one patch; an image smaller than one '
                         f'{patch_size}x{patch_size} patch cannot be embedded: resize it or use a smaller '
                         f'patch_size (now patch_size={patch_size})')
    stride = patch_size if stride is None else stride
    pad_height, pad_width = -(height - patch_size) % stride, -(width - patch_size) % stride
    return F.pad(x, (0, pad_width, 0, pad_height)) if pad_height or pad_width else x


def patch_grid(size: Tuple[int, int], patch_size: int, stride: int) -> Tuple[int, int]:
    """Patch grid of an image of ``size`` after :func:`pad_to_patches`: ``ceil((S - patch_size) / stride) + 1``."""
    return tuple(-(-(side - patch_size) // stride) + 1 for side in size)
