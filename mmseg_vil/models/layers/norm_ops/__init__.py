"""The blocks' LayerNorm, written in the dtype of the product it feeds: our Triton kernels on CUDA (or under
``TRITON_INTERPRET=1``), PyTorch's LayerNorm elsewhere. Same function and gradients either way. A block's residual
add can run in the next block's norm (:func:`add_layer_norm`): in the Triton kernels, and without autograd on the CPU
in the C++ kernels (:mod:`..cpu_kernels`)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import cpu_kernels

try:
    from ..mlstm.fused import _kernels_interpreted as kernels_interpreted
    from . import ops
except ImportError:  # no Triton
    ops = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype products of ``x`` run in: autocast's for the device if enabled, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _runs_kernels(x: Tensor, out_dtype: torch.dtype) -> bool:
    return ops is not None and x.dtype in SUPPORTED_DTYPES and out_dtype in SUPPORTED_DTYPES and (
        x.is_cuda or kernels_interpreted())


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    """LayerNorm over the last dim of ``x`` (statistics in float32 or above), returned in ``out_dtype``."""
    if _runs_kernels(x, out_dtype):
        return ops.layer_norm(x, weight, bias, eps, out_dtype)[0]
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype)


def _cpu_adds(*tensors: Optional[Tensor]) -> bool:
    """Whether the C++ kernels may add and normalise ``tensors`` (x, the update, the norm's parameters)."""
    return cpu_kernels.usable(*tensors) and all(t is None or t.is_contiguous() for t in tensors)


def fuses_adds(x: Tensor) -> bool:
    """Whether the norms of ``x`` (in the compute dtype) run as kernels that also take a residual add
    (:func:`add_layer_norm`): the Triton kernels, or the C++ ones for inference on the CPU."""
    return _runs_kernels(x, compute_dtype(x)) or _cpu_adds(x)


def adds_update_biases(x: Tensor) -> bool:
    """Whether :func:`add_layer_norm` adds an update's bias in the same pass as the residual (the C++ kernel, without
    autograd on the CPU), so that a block may leave its down-projection's bias to it; elsewhere the bias would cost a
    pass of its own."""
    return not torch.is_grad_enabled() and _cpu_adds(x)


def add_layer_norm(x: Tensor, update: Tensor, update_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                   eps: float, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``x + (update + update_bias)`` (``update_bias``: a bias of the update not yet added, or None) and
    :func:`layer_norm` of it: the same function and gradients as the separate ops, one kernel where the norm runs as
    a kernel and the sum keeps ``x``'s dtype and shape. Without autograd on the CPU the C++ kernel writes the sum into
    ``update`` (a block's output, which the caller does not keep)."""
    if (out_dtype == x.dtype and update.shape == x.shape and not torch.is_grad_enabled()
            and _cpu_adds(x, update, update_bias, weight, bias)):
        return cpu_kernels.add_layer_norm_(x, update, weight, bias, eps, update_bias)
    if update_bias is not None:
        update = update + update_bias
    if _runs_kernels(x, out_dtype) and update.shape == x.shape and update.device == x.device and (
            torch.promote_types(x.dtype, update.dtype) == x.dtype):
        return tuple(ops.add_layer_norm(x, update, weight, bias, eps, out_dtype)[:2])
    x = x + update
    return x, layer_norm(x, weight, bias, eps, out_dtype)


__all__ = ['add_layer_norm', 'adds_update_biases', 'compute_dtype', 'fuses_adds', 'layer_norm']
