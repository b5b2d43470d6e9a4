"""The elementwise stages of the ViL mixer in plain PyTorch: the reference of the fused kernels, and the CPU path.

Both stages work on tokens in row-major order of the (never flipped) image, ``(B, N, C)`` channels-last, so the
backbone moves no data between layouts:

* :func:`conv_qkv`: depthwise conv + bias + SiLU of the mLSTM branch, then the block-diagonal q/k (of the conv
  output) and v (of the conv input) projections, written side by side as ``qkv (B, N, 3E)``.
* :func:`gated_output`: per-head LayerNorm of the mLSTM output, affine, learnable skip of the conv output, SiLU
  output gate.

Why no flips: the official reverse blocks flip the tokens before the up-projection and after the down-projection.
Every token-wise op commutes with the flip; the conv of the 180-degree-rotated image rotated back is the conv with
the kernel rotated by 180 degrees (odd kernels, symmetric padding); the mLSTM runs anti-causally (``reverse``).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def block_diagonal(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``P`` block-diagonal projections of ``x (..., E)`` concatenated: ``(..., P * E)``.

    ``weight (P, E / S, S, S)``: ``weight[p, b, o, i]`` maps input channel ``b * S + i`` to output ``b * S + o``;
    ``bias (P, E)``.
    """
    blocks = x.unflatten(-1, (-1, weight.shape[-1]))
    out = torch.einsum('...bi,pboi->...pbo', blocks, weight)
    return (out.flatten(-2) + bias).flatten(-2)


def depthwise_conv_tokens(x: Tensor, grid: Tuple[int, int], weight: Tensor, bias: Tensor, reverse: bool) -> Tensor:
    """Depthwise conv (zero padding, same size) of tokens ``(B, N, E)`` laid out on ``grid``; ``(B, N, E)`` out.

    ``reverse`` rotates the kernel by 180 degrees: the official reverse block convolves the rotated image.
    """
    if reverse:
        weight = weight.flip(-2, -1)
    image = x.unflatten(1, grid).permute(0, 3, 1, 2)  # channels-last view, no copy
    out = F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1).flatten(1, 2)


def conv_qkv(x: Tensor, grid: Tuple[int, int], conv_weight: Tensor, conv_bias: Tensor, qkv_weight: Tensor,
             qkv_bias: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    """``x (B, N, E)`` -> ``(silu(conv(x)), cat([q, k, v]))``; ``qkv_weight (3, E / S, S, S)``, ``qkv_bias (3, E)``."""
    x_conv = F.silu(depthwise_conv_tokens(x, grid, conv_weight, conv_bias, reverse))
    qk = block_diagonal(x_conv, qkv_weight[:2], qkv_bias[:2])
    v = block_diagonal(x, qkv_weight[2:], qkv_bias[2:])
    return x_conv, torch.cat([qk, v], dim=-1)


def gated_output(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Tensor, skip: Tensor,
                 eps: float) -> Tensor:
    """``(LayerNorm_per_head(h) * w + b + skip * x_conv) * silu(z)`` for ``h (B, N, NH, DH)``; ``(B, N, E)`` out."""
    normed = F.layer_norm(h, h.shape[-1:], eps=eps).flatten(2) * norm_weight + norm_bias
    return (normed + skip * x_conv) * F.silu(z)
