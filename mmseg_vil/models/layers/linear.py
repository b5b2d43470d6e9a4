"""``F.linear`` whose bias gradient is a matrix-vector product with ones instead of PyTorch's column sum.

Why: autograd sums the output gradient over the tokens with a column reduction, which at ViL's widths is slow on the
GPU (:mod:`.column_sums`: 0.55 ms of an 18 ms ViL-T training step at 224 px batch 64 on an H200). Same function; the
same products for the input and weight gradients, in the dtype autocast runs them in (the bias gradient is rounded to
that dtype, as autograd's sum is).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .column_sums import column_sums
from .norm_ops import compute_dtype


class _Linear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        x, cast_weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x, cast_weight, bias.to(dtype))
        ctx.save_for_backward(x, cast_weight)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad @ weight if need_x else None
        grad_weight = (rows.t() @ x.reshape(-1, x.shape[-1])).to(ctx.dtypes[0]) if need_weight else None
        grad_bias = column_sums(rows).to(ctx.dtypes[1]) if need_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)`` under the same autocast rules; the bias gradient by a product (module
    docstring) where autograd records a bias gradient."""
    if bias is None or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)
