"""The blocks' LayerNorm on our Triton kernels as torch.library custom ops with registered autograd.

Why: PyTorch's LayerNorm at ViL's widths (192-768) spends longer on its weight gradients than on the rows, and under
autocast its float32 output is cast again for the up-projection. Here the forward writes the compute dtype directly,
the backward gives the input gradient and the weight and bias gradient terms in one pass. ``add_layer_norm`` also
takes the previous block's residual add (one read of the residual stream fewer each way, and no separate add, gradient
sum and gradient cast).
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
# No fused multiply-adds in the backward: with them the GPU folded the norm's last product into the add of the residual
# stream's gradient (one rounding where autograd's sum of the two gradients has two), so the fused add's float32/64
# gradients missed the block-by-block model's bits on the H100 (2026-12-08); the interpreter never fuses.
BACKWARD_LAUNCH = dict(enable_fp_fusion=False)


def _accumulator(dtype: torch.dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(x: Tensor) -> Tuple[int, int, dict]:
    dim = x.shape[-1]
    block_d = triton.next_power_of_2(dim)
    options = dict(ROWS=max(1, ROW_ELEMENTS // block_d), BLOCK_D=block_d,
                   ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=4)
    return x.numel() // dim, dim, options


def _forward(x: Tensor, update: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
             out_dtype: torch.dtype) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """``x + update`` if an update is given (else None), and the norm of it (or of ``x``) with its statistics."""
    x = x.contiguous()
    rows, dim, options = _launch(x)
    acc = _accumulator(x.dtype)
    summed = None if update is None else torch.empty_like(x)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean, rstd = (torch.empty(rows, dtype=acc, device=x.device) for _ in range(2))
    kernels.layer_norm_forward_kernel[(triton.cdiv(rows, options['ROWS']),)](
        x, None if update is None else update.contiguous(), summed, weight, bias, y, mean, rstd, rows, dim,
        full(1, eps, x, acc), HAS_BIAS=bias is not None, ADD_UPDATE=update is not None, **options)
    return summed, y, mean, rstd


@custom_op('mmseg_vil::layer_norm')
def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
               out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim of ``x``, written in ``out_dtype``; also each row's mean and 1/std."""
    return _forward(x, None, weight, bias, eps, out_dtype)[1:]


@layer_norm.register_fake
def _(x, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1]
    acc = _accumulator(x.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


@custom_op('mmseg_vil::add_layer_norm')
def add_layer_norm(x: Tensor, update: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                   out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x + update`` (in ``x``'s dtype) and its LayerNorm in ``out_dtype``, with each row's mean and 1/std: a
    block's residual add fused with the next block's norm."""
    return _forward(x, update, weight, bias, eps, out_dtype)


@add_layer_norm.register_fake
def _(x, update, weight, bias, eps, out_dtype):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *layer_norm.op(x, weight, bias, eps,
                                                                                         out_dtype))


def _backward_kernel(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                     grad_residual: Optional[Tensor], grad_update: Optional[Tensor]) -> List[Tensor]:
    x = x.contiguous()
    rows, dim, options = _launch(x)
    programs = triton.cdiv(rows, options['ROWS'] * BACKWARD_TILES)
    grad_x = torch.empty_like(x)
    partial = torch.empty(programs, 2, dim, dtype=mean.dtype, device=x.device)
    kernels.layer_norm_backward_kernel[(programs,)](
        x, weight, mean, rstd, grad_y.contiguous(), None if grad_residual is None else grad_residual.contiguous(),
        grad_x, grad_update, partial, rows, dim, ADD_GRAD=grad_residual is not None,
        STORE_UPDATE_GRAD=grad_update is not None, TILES=BACKWARD_TILES, **options, **BACKWARD_LAUNCH)
    return [grad_x, column_sums(partial.flatten(1)).view(2, dim)]


@custom_op('mmseg_vil::layer_norm_backward')
def layer_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> List[Tensor]:
    """The gradient of ``x`` (its dtype), and those of the weight and the bias as one ``(2, D)`` tensor in the
    accumulator's dtype (two outputs of a custom op may not be views of one tensor)."""
    return _backward_kernel(grad_y, x, weight, mean, rstd, None, None)


@layer_norm_backward.register_fake
def _(grad_y, x, weight, mean, rstd):
    return [torch.empty_like(x, memory_format=torch.contiguous_format), mean.new_empty(2, x.shape[-1])]


@custom_op('mmseg_vil::add_layer_norm_backward')
def add_layer_norm_backward(grad_y: Tensor, grad_summed: Optional[Tensor], summed: Tensor, weight: Tensor,
                            mean: Tensor, rstd: Tensor, update_dtype: torch.dtype) -> List[Tensor]:
    """:func:`layer_norm_backward` of :func:`add_layer_norm`: the gradient of ``x`` (the norm's input gradient plus
    ``grad_summed``, that of the sum), the same in ``update_dtype`` (the update's gradient), and the weight and bias
    gradients as one ``(2, D)`` tensor."""
    grad_update = torch.empty(summed.shape, dtype=update_dtype, device=summed.device)
    return [*_backward_kernel(grad_y, summed, weight, mean, rstd, grad_summed, grad_update), grad_update]


@add_layer_norm_backward.register_fake
def _(grad_y, grad_summed, summed, weight, mean, rstd, update_dtype):
    return [*layer_norm_backward.op(grad_y, summed, weight, mean, rstd),
            torch.empty(summed.shape, dtype=update_dtype, device=summed.device)]


def _param_grads(ctx, param_grads: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    grad_weight, grad_bias = param_grads.unbind(0)
    return grad_weight.to(ctx.param_dtypes[0]), grad_bias.to(ctx.param_dtypes[1]) if ctx.has_bias else None


def _save_params(ctx, weight: Tensor, bias: Optional[Tensor]) -> None:
    ctx.has_bias = bias is not None
    ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
    ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero tensors for them


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, _ = inputs
    ctx.save_for_backward(x, weight, *output[1:])
    _save_params(ctx, weight, bias)


def _backward(ctx, grad_y, *_):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, param_grads = layer_norm_backward(grad_y, x, weight, mean, rstd)
    return (grad_x, *_param_grads(ctx, param_grads), None, None)


layer_norm.register_autograd(_backward, setup_context=_setup_context)


def _add_setup_context(ctx, inputs, output) -> None:
    _, update, weight, bias, _, _ = inputs
    ctx.save_for_backward(output[0], weight, *output[2:])
    ctx.update_dtype = update.dtype
    _save_params(ctx, weight, bias)


def _add_backward(ctx, grad_summed, grad_y, *_):
    if grad_y is None:  # the norm is unused: the add's gradient alone
        return grad_summed, grad_summed.to(ctx.update_dtype), None, None, None, None
    summed, weight, mean, rstd = ctx.saved_tensors
    grad_x, param_grads, grad_update = add_layer_norm_backward(grad_y, grad_summed, summed, weight, mean, rstd,
                                                               ctx.update_dtype)
    return (grad_x, grad_update, *_param_grads(ctx, param_grads), None, None)


add_layer_norm.register_autograd(_add_backward, setup_context=_add_setup_context)
