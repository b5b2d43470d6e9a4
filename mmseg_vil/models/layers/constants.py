"""Small constant tensors (the ones of :func:`.column_sums`, a norm's eps) cached per value, dtype and device.

Why: a fresh one is a fill kernel on every call, about 2 us each on the GPU and seven per ViL block in a training
step, also inside CUDA graphs. None is cached while a CUDA graph is being captured (a tensor filled in a capture holds
garbage until the graph first replays) or while something traces (torch.compile, fake tensors, dispatch modes): then
the constant is made afresh, as before.
"""
from typing import Dict, Tuple

import torch
from torch import Tensor

from .custom_op import runs_directly

_CACHE: Dict[Tuple[float, torch.dtype, torch.device], Tensor] = {}


def full(length: int, value: float, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``length`` elements equal to ``value`` in ``dtype`` on ``like``'s device, to be read only: a view of a cached
    tensor where that is safe (module docstring)."""
    if not runs_directly((like,)) or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.full((length,), value, dtype=dtype, device=like.device)
    key = (value, dtype, like.device)
    cached = _CACHE.get(key)
    if cached is None or len(cached) < length:
        cached = _CACHE[key] = torch.full((length,), value, dtype=dtype, device=like.device)
    return cached[:length]
