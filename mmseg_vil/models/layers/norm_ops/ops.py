"""The blocks' LayerNorm on our Triton kernels as torch.library custom ops with registered autograd.

Why: PyTorch's LayerNorm at ViL's widths (192-768) spends longer on its weight gradients than on the rows, and under
autocast its float32 output is cast again for the up-projection. Here the forward writes the compute dtype directly,
the backward gives the input gradient and the weight and bias gradient terms in one pass.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..column_sums import column_sums
from ..constants import full
from ..custom_op import custom_op
from . import _kernels as kernels

ROW_ELEMENTS = 2048  # elements of a program's (rows, D) tile
BACKWARD_TILES = 4  # row tiles each backward program walks


def _accumulator(dtype: torch.dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(x: Tensor) -> Tuple[int, int, dict]:
    dim = x.shape[-1]
    block_d = triton.next_power_of_2(dim)
    options = dict(ROWS=max(1, ROW_ELEMENTS // block_d), BLOCK_D=block_d,
                   ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=4)
    return x.numel() // dim, dim, options


@custom_op('mmseg_vil::layer_norm')
def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
               out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim of ``x``, written in ``out_dtype``; also each row's mean and 1/std."""
    x = x.contiguous()
    rows, dim, options = _launch(x)
    acc = _accumulator(x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean, rstd = (torch.empty(rows, dtype=acc, device=x.device) for _ in range(2))
    kernels.layer_norm_forward_kernel[(triton.cdiv(rows, options['ROWS']),)](
        x, weight, bias, y, mean, rstd, rows, dim, full(1, eps, x, acc), HAS_BIAS=bias is not None, **options)
    return y, mean, rstd


@layer_norm.register_fake
def _(x, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1]
    acc = _accumulator(x.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


@custom_op('mmseg_vil::layer_norm_backward')
def layer_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> List[Tensor]:
    """The gradient of ``x`` (its dtype), and those of the weight and the bias as one ``(2, D)`` tensor in the
    accumulator's dtype (two outputs of a custom op may not be views of one tensor)."""
    x = x.contiguous()
    rows, dim, options = _launch(x)
    programs = triton.cdiv(rows, options['ROWS'] * BACKWARD_TILES)
    grad_x = torch.empty_like(x)
    partial = torch.empty(programs, 2, dim, dtype=mean.dtype, device=x.device)
    kernels.layer_norm_backward_kernel[(programs,)](x, weight, mean, rstd, grad_y.contiguous(), grad_x, partial, rows,
                                                    dim, TILES=BACKWARD_TILES, **options)
    return [grad_x, column_sums(partial.flatten(1)).view(2, dim)]


@layer_norm_backward.register_fake
def _(grad_y, x, weight, mean, rstd):
    return [torch.empty_like(x, memory_format=torch.contiguous_format), mean.new_empty(2, x.shape[-1])]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, _ = inputs
    ctx.save_for_backward(x, weight, *output[1:])
    ctx.has_bias = bias is not None
    ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
    ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero tensors for them


def _backward(ctx, grad_y, *_):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, param_grads = layer_norm_backward(grad_y, x, weight, mean, rstd)
    grad_weight, grad_bias = param_grads.unbind(0)
    return (grad_x, grad_weight.to(ctx.param_dtypes[0]), grad_bias.to(ctx.param_dtypes[1]) if ctx.has_bias else None,
            None, None)


layer_norm.register_autograd(_backward, setup_context=_setup_context)
