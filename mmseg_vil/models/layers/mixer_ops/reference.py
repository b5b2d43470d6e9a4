"""The elementwise stages of the ViL mixer in plain PyTorch: the reference of the fused kernels, and the CPU path.

Both stages work on tokens in row-major order of the (never flipped) image, ``(B, N, C)`` channels-last, so the
backbone moves no data between layouts:

* :func:`conv_qkv`: depthwise conv + bias + SiLU of the mLSTM branch, then the block-diagonal q/k (of the conv
  output) and v (of the conv input) projections, written side by side as ``qkv (B, N, 3E)`` (the kernels'
  reference); :func:`conv_qkv_heads` writes them in the mLSTM's head layout instead (the CPU path).
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
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

CONV_KINDS = ('2d', 'causal1d')


def _tile_blocks(num_blocks: int, block_size: int) -> int:
    """Blocks per tile of :func:`block_diagonal`: tiles about 16 channels wide that divide the channels evenly."""
    return max(t for t in range(1, max(1, 16 // block_size) + 1) if num_blocks % t == 0)


def counting_flops() -> bool:
    """Whether a ``FlopCounterMode`` watches: it should count the model's products, not the tiles' zeros."""
    # The dispatch mode is FlopCounterMode itself or, in newer torch, a private class of its module.
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0
            and any(type(mode).__module__ == FlopCounterMode.__module__ for mode in _get_current_dispatch_mode_stack()))


def _block_products(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """:func:`block_diagonal` as one small product per block (the official form and operation count)."""
    product = torch.einsum('...bi,pboi->...pbo', x.unflatten(-1, weight.shape[1:3]), weight).flatten(-2)
    if bias is not None:
        product = product + bias
    if out is None:
        return product.flatten(-2)
    out.view(product.shape).copy_(product)
    return out


def _tile_products(x: Tensor, weight: Tensor, per_tile: int) -> Tensor:
    """``x (..., E)`` times ``weight (P, E / S, S, S)`` as one batched matmul over tiles of ``per_tile`` blocks:
    ``(tiles, tokens, P * width)`` with ``width = per_tile * S``, tile-major, biases not added.

    Each tile is a dense block-diagonal matrix: a 4 x 4 product is too small to run alone, and a tile's zeros cost
    less than the layout copies of a product per block.
    """
    projections, num_blocks, size, _ = weight.shape
    tiles, width = num_blocks // per_tile, per_tile * size
    eye = torch.eye(per_tile, dtype=weight.dtype, device=weight.device)
    # dense[t, j * S + i, p, l * S + o] = weight[p, t * per_tile + j, o, i] where j == l, else 0
    dense = torch.einsum('ptjoi,jl->tjiplo', weight.view(projections, tiles, per_tile, size, size), eye)
    return torch.bmm(x.reshape(-1, tiles, width).transpose(0, 1), dense.reshape(tiles, width, projections * width))


def block_diagonal(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``P`` block-diagonal projections of ``x (..., E)`` side by side: ``(..., P * E)``, written into ``out`` if given.

    ``weight (P, E / S, S, S)``: ``weight[p, b, o, i]`` maps input channel ``b * S + i`` to output ``b * S + o``;
    ``bias (P, E)`` or ``None``. Tiles of about 16 channels (:func:`_tile_products`; on CPU, ViL-T: 0.3 instead of
    1.3 ms per projection of 1024 tokens for products per block). Under a FLOP counter the products per block run
    instead, so that the count is the model's (the official one), not the tiles'.
    """
    if counting_flops():
        return _block_products(x, weight, bias, out)
    projections, num_blocks, size, _ = weight.shape
    per_tile = _tile_blocks(num_blocks, size)
    tiles, width = num_blocks // per_tile, per_tile * size
    product = _tile_products(x, weight, per_tile).view(tiles, -1, projections, width).permute(1, 2, 0, 3)
    if out is None:
        out = x.new_empty(*x.shape[:-1], projections * x.shape[-1])
    _copy_adding(product, None if bias is None else bias.view(projections, tiles, width),
                 out.view(-1, projections, tiles, width))
    return out


def _copy_adding(product: Tensor, bias: Optional[Tensor], out: Tensor) -> None:
    """``out = product (+ bias)``; in eager mode without autograd in one pass over the tokens (``out=`` is not
    differentiable, and Inductor fuses the sum into the copy itself)."""
    if bias is None:
        out.copy_(product)
    elif torch.compiler.is_compiling() or (torch.is_grad_enabled() and (product.requires_grad or bias.requires_grad)):
        out.copy_(product + bias)
    else:
        torch.add(product, bias, out=out)


def block_diagonal_heads(x: Tensor, weight: Tensor, bias: Optional[Tensor], num_heads: int, out: Tensor) -> Tensor:
    """:func:`block_diagonal` of ``x (B, N, E)`` written into ``out (P, B, NH, N, DH)`` (contiguous): the mLSTM's
    head layout, so that the tile-major product is copied once, straight into the layout the cell reads."""
    if counting_flops():
        return out.copy_(_block_products(x, weight, bias, None).unflatten(-1, (len(out), num_heads, -1))
                         .permute(2, 0, 3, 1, 4))
    projections, num_blocks, size, _ = weight.shape
    per_tile = _tile_blocks(num_blocks // num_heads, size)  # tiles never straddle two heads
    tiles, width = num_blocks // per_tile, per_tile * size
    batch, n = x.shape[:2]
    layout = (num_heads, tiles // num_heads, batch, n, projections, width)
    product = _tile_products(x, weight, per_tile).view(layout).permute(4, 2, 0, 3, 1, 5)
    _copy_adding(product, None if bias is None else bias.view(projections, 1, num_heads, 1, tiles // num_heads, width),
                 out.view(projections, batch, num_heads, n, tiles // num_heads, width))
    return out


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


def conv_silu(x: Tensor, grid: Tuple[int, int], conv_weight: Tensor, conv_bias: Optional[Tensor], reverse: bool,
              conv_kind: str = '2d') -> Tensor:
    """``silu(conv(x))`` of tokens ``x (B, N, E)``; ``conv_kind``: ``'2d'`` (square odd kernel on the token grid,
    ``conv_weight (E, 1, K, K)``) or ``'causal1d'`` (along the token sequence, ``conv_weight (E, 1, K)``)."""
    if conv_kind == '2d':
        return F.silu(depthwise_conv_tokens(x, grid, conv_weight, conv_bias, reverse))
    if conv_kind == 'causal1d':
        return F.silu(causal_conv1d_tokens(x, conv_weight, conv_bias, reverse))
    raise ValueError(f'conv_kind={conv_kind!r} is not supported; choose one of {CONV_KINDS}')


def conv_qkv(x: Tensor, grid: Tuple[int, int], conv_weight: Tensor, conv_bias: Optional[Tensor], qkv_weight: Tensor,
             qkv_bias: Optional[Tensor], reverse: bool, conv_kind: str = '2d') -> Tuple[Tensor, Tensor]:
    """``x (B, N, E)`` -> ``(silu(conv(x)), cat([q, k, v]))``, token-major as the Triton kernel writes them;
    ``qkv_weight (3, E / S, S, S)``, ``qkv_bias (3, E)``; conv as in :func:`conv_silu`."""
    x_conv = conv_silu(x, grid, conv_weight, conv_bias, reverse, conv_kind)
    inner = x.shape[-1]
    qkv = x.new_empty(*x.shape[:-1], 3 * inner)
    block_diagonal(x_conv, qkv_weight[:2], None if qkv_bias is None else qkv_bias[:2], qkv[..., :2 * inner])
    block_diagonal(x, qkv_weight[2:], None if qkv_bias is None else qkv_bias[2:], qkv[..., 2 * inner:])
    return x_conv, qkv


def conv_qkv_heads(x: Tensor, grid: Tuple[int, int], conv_weight: Tensor, conv_bias: Optional[Tensor],
                   qkv_weight: Tensor, qkv_bias: Optional[Tensor], num_heads: int, reverse: bool,
                   conv_kind: str = '2d', out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`conv_qkv` with q, k, v in the mLSTM's head layout, ``qkv (3, B, NH, N, DH)`` contiguous: the CPU path
    (one copy of the projections' output fewer than token-major q/k/v, which the cell copies again). ``out``: a
    buffer of that shape to write them into instead (the last dim contiguous, e.g. the real steps of the chunkwise
    cell's padded layout)."""
    x_conv = conv_silu(x, grid, conv_weight, conv_bias, reverse, conv_kind)
    batch, n, inner = x.shape
    qkv = x.new_empty(3, batch, num_heads, n, inner // num_heads) if out is None else out
    biases = (None, None) if qkv_bias is None else (qkv_bias[:2], qkv_bias[2:])
    block_diagonal_heads(x_conv, qkv_weight[:2], biases[0], num_heads, qkv[:2])
    block_diagonal_heads(x, qkv_weight[2:], biases[1], num_heads, qkv[2:])
    return x_conv, qkv


def gate_preactivations(qkv: Tensor, gate_weight: Tensor, gate_bias: Tensor) -> Tensor:
    """Gate pre-activations ``(B, G, N)`` (each gate contiguous along the tokens, as the mLSTM reads them) of
    ``gate_weight (G, 3 E) @ cat([q, k, v])`` for ``qkv (3, B, NH, N, DH)`` in the head layout or a token-major view.
    """
    projections, batch, heads, n, head_dim = qkv.shape
    token_major = qkv.permute(1, 3, 0, 2, 4)
    if token_major.is_contiguous():
        weight = gate_weight.expand(batch, -1, -1)
        return torch.baddbmm(gate_bias.view(1, -1, 1), weight, token_major.reshape(batch, n, -1).transpose(1, 2))
    # per head and projection (G, DH) @ (DH, N), summed: the wide product is many times faster than (N, DH) @ (DH, G)
    weight = gate_weight.view(-1, projections, heads, head_dim).permute(1, 2, 0, 3).unsqueeze(1)
    return torch.matmul(weight, qkv.transpose(-1, -2)).sum((0, 2)) + gate_bias.unsqueeze(-1)


def fold_gate_weights(qkv_weight: Tensor, qkv_bias: Optional[Tensor], gate_weight: Tensor,
                      gate_bias: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(A, B, c)`` with ``gates = A x_conv + B x + c``: the gates are linear in q | k | v, which are linear in
    ``x_conv`` (q, k) and ``x`` (v); ``A``, ``B`` of ``(G, E)``, ``c (G,)`` (see :func:`folded_gate_preactivations`)."""
    num_gates, blocks, size = len(gate_weight), qkv_weight.shape[1], qkv_weight.shape[2]
    # folded[p, g, b, i] = sum_o gate_weight[g, p, b, o] * qkv_weight[p, b, o, i]
    per_projection = gate_weight.view(num_gates, 3, blocks, size).transpose(0, 1)
    folded = torch.einsum('pgbo,pboi->pgbi', per_projection, qkv_weight).flatten(2)
    bias = gate_bias if qkv_bias is None else gate_bias + torch.einsum('pgc,pc->g', per_projection.flatten(2), qkv_bias)
    return folded[0] + folded[1], folded[2], bias


def folded_gate_preactivations(x_conv: Tensor, x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor],
                               gate_weight: Tensor, gate_bias: Tensor) -> Tensor:
    """:func:`gate_preactivations` from the projections' inputs: the gates are linear in q | k | v, which are linear
    in ``x_conv`` (q, k) and ``x`` (v), so ``gates = A x_conv + B x + c`` with ``A``, ``B`` of ``(G, E)``: two products
    of width G instead of one of 3E over q | k | v (on CPU, ViL-T at 1024 tokens: 0.15 instead of 0.44 ms). The same
    function up to rounding; ``(B, G, N)``."""
    conv_weight, input_weight, bias = fold_gate_weights(qkv_weight, qkv_bias, gate_weight, gate_bias)
    batch = len(x)
    gates = torch.baddbmm(bias.view(1, -1, 1), conv_weight.expand(batch, -1, -1), x_conv.transpose(1, 2))
    return torch.baddbmm(gates, input_weight.expand(batch, -1, -1), x.transpose(1, 2))


def gated_output_(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor],
                  skip: Tensor, eps: float) -> Tensor:
    """:func:`gated_output` without autograd, overwriting ``z`` (a temporary of the caller) and the norm's output: the
    CPU inference path (no allocation but the norm's)."""
    normed = F.layer_norm(h, h.shape[-1:], eps=eps).flatten(2)
    if norm_bias is None:
        normed.mul_(norm_weight)
    else:
        torch.addcmul(norm_bias, normed, norm_weight, out=normed)
    return normed.addcmul_(skip, x_conv).mul_(F.silu(z, inplace=True))


def gated_output(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], skip: Tensor,
                 eps: float) -> Tensor:
    """``(LayerNorm_per_head(h) * w [+ b] + skip * x_conv) * silu(z)`` for ``h (B, N, NH, DH)``; ``(B, N, E)`` out."""
    normed = F.layer_norm(h, h.shape[-1:], eps=eps).flatten(2)
    # multiply-adds in one pass each (the CPU path: each elementwise pass over the tokens costs about as much)
    normed = normed * norm_weight if norm_bias is None else torch.addcmul(norm_bias, normed, norm_weight)
    return torch.addcmul(normed, skip, x_conv) * F.silu(z)
