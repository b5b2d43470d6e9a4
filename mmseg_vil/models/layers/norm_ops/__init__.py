"""The blocks' LayerNorm, written in the dtype of the product it feeds: our Triton kernels on CUDA (or under
``TRITON_INTERPRET=1``), PyTorch's LayerNorm elsewhere. Same function and gradients either way."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

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


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    """LayerNorm over the last dim of ``x`` (statistics in float32 or above), returned in ``out_dtype``."""
    if ops is not None and x.dtype in SUPPORTED_DTYPES and out_dtype in SUPPORTED_DTYPES and (
            x.is_cuda or kernels_interpreted()):
        return ops.layer_norm(x, weight, bias, eps, out_dtype)[0]
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype)


__all__ = ['compute_dtype', 'layer_norm']
