"""The elementwise stages of the ViL mixer in plain PyTorch: the reference of the fused kernels, and the CPU path.

Both stages work on tokens in row-major order of the (never flipped) image, ``(B, N, C)`` channels-last, so the
backbone moves no data between layouts:

* :func:`conv_qkv`: depthwise conv + bias + SiLU of the mLSTM branch, then the block-diagonal q/k (of the conv
  output) and v (of the conv input) projections, written side by side as ``qkv (B, N, 3E)``.
* :func:`gated_output`: per-head LayerNorm of the mLSTM output, affine, learnable skip of the conv output, SiLU
  output gate.

Biases are optional (``None``): the v1 models (``VisionLSTM``) have none in their projections and norms.

Why no flips: the official reverse blocks flip the tokens before the up-projection and after the down-projection.
Every token-wise op commutes with the flip; the conv of the 180-degree-rotated image rotated back is the conv with
the kernel rotated by 180 degrees (odd kernels, symmetric padding); the causal 1-D conv of the flipped sequence
flipped back is the anti-causal conv with the kernel reversed; the mLSTM runs anti-causally (``reverse``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

CONV_KINDS = ('2d', 'causal1d')


def block_diagonal(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``P`` block-diagonal projections of ``x (..., E)`` concatenated: ``(..., P * E)``.

    ``weight (P, E / S, S, S)``: ``weight[p, b, o, i]`` maps input channel ``b * S + i`` to output ``b * S + o``;
    ``bias (P, E)`` or ``None``.
    """
    blocks = x.unflatten(-1, (-1, weight.shape[-1]))
    out = torch.einsum('...bi,pboi->...pbo', blocks, weight).flatten(-2)
    return (out if bias is None else out + bias).flatten(-2)


def depthwise_conv_tokens(x: Tensor, grid: Tuple[int, int], weight: Tensor, bias: Optional[Tensor],
                          reverse: bool) -> Tensor:
    """Depthwise conv (zero padding, same size) of tokens ``(B, N, E)`` laid out on ``grid``; ``(B, N, E)`` out.

    ``reverse`` rotates the kernel by 180 degrees: the official reverse block convolves the rotated image.
    """
    if reverse:
        weight = weight.flip(-2, -1)
    image = x.unflatten(1, grid).permute(0, 3, 1, 2)  # channels-last view, no copy
    out = F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1).flatten(1, 2)


def causal_conv1d_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool) -> Tensor:
    """Causal depthwise conv of tokens ``(B, N, E)`` along the sequence, ``weight (E, 1, K)``; ``(B, N, E)`` out.

    Output ``t`` sees inputs ``t - K + 1 .. t`` (zero before the first token). ``reverse`` gives the official reverse
    block's conv of the flipped sequence: anti-causal (inputs ``t .. t + K - 1``) with the kernel reversed.
    """
    pad = weight.shape[-1] - 1
    if reverse:
        weight = weight.flip(-1)
    sequence = F.pad(x.transpose(1, 2), (0, pad) if reverse else (pad, 0))
    return F.conv1d(sequence, weight, bias, groups=x.shape[-1]).transpose(1, 2)


def conv_qkv(x: Tensor, grid: Tuple[int, int], conv_weight: Tensor, conv_bias: Optional[Tensor], qkv_weight: Tensor,
             qkv_bias: Optional[Tensor], reverse: bool, conv_kind: str = '2d') -> Tuple[Tensor, Tensor]:
    """``x (B, N, E)`` -> ``(silu(conv(x)), cat([q, k, v]))``; ``qkv_weight (3, E / S, S, S)``, ``qkv_bias (3, E)``.

    ``conv_kind``: ``'2d'`` (square odd kernel on the token grid, ``conv_weight (E, 1, K, K)``) or ``'causal1d'``
    (along the token sequence, ``conv_weight (E, 1, K)``).
    """
    if conv_kind == '2d':
        x_conv = depthwise_conv_tokens(x, grid, conv_weight, conv_bias, reverse)
    elif conv_kind == 'causal1d':
        x_conv = causal_conv1d_tokens(x, conv_weight, conv_bias, reverse)
    else:
        raise ValueError(f'conv_kind={conv_kind!r} is not supported; choose one of {CONV_KINDS}')
    x_conv = F.silu(x_conv)
    qk = block_diagonal(x_conv, qkv_weight[:2], None if qkv_bias is None else qkv_bias[:2])
    v = block_diagonal(x, qkv_weight[2:], None if qkv_bias is None else qkv_bias[2:])
    return x_conv, torch.cat([qk, v], dim=-1)


def gated_output(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], skip: Tensor,
                 eps: float) -> Tensor:
    """``(LayerNorm_per_head(h) * w [+ b] + skip * x_conv) * silu(z)`` for ``h (B, N, NH, DH)``; ``(B, N, E)`` out."""
    normed = F.layer_norm(h, h.shape[-1:], eps=eps).flatten(2) * norm_weight
    if norm_bias is not None:
        normed = normed + norm_bias
    return (normed + skip * x_conv) * F.silu(z)
