"""Small constant tensors (the ones of :func:`.column_sums`, a norm's eps) cached per value, dtype and device.

Why: a fresh one is a fill kernel on every call, about 2 us each on the GPU and seven per ViL block in a training
step, also inside CUDA graphs. On CUDA a constant is cached only where it is made on the device's default stream
outside a capture: CUDA graph captures and torch.compile's CUDA-graph trees (their warm-up runs too) run on side
streams and allocate from private pools, whose memory later replays overwrite, and the trees refuse live tensors in
their pool that are not outputs (RuntimeError "Detected 1 tensor(s) in the cudagraph pool not tracked as outputs",
H100, 2026-12-08). There, and while something traces (torch.compile, fake tensors, dispatch modes), a constant is
made afresh unless an earlier one is cached. A cached tensor is never freed, even when a longer one replaces it: a
captured graph may hold its address.
"""
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .custom_op import runs_directly

_CACHE: Dict[Tuple[float, torch.dtype, torch.device], Tensor] = {}
_REPLACED: List[Tensor] = []  # shorter constants that longer ones replaced, kept alive for the graphs that read them
# The views handed out, per length: a slice is a dispatch on the host, which an eager GPU step waits for
_VIEWS: Dict[Tuple[float, torch.dtype, torch.device, int], Tensor] = {}


def full(length: int, value: float, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``length`` elements equal to ``value`` in ``dtype`` on ``like``'s device, to be read only: a view of a cached
    tensor where that is safe (module docstring)."""
    if not runs_directly((like,)):
        return torch.full((length,), value, dtype=dtype, device=like.device)
    key = (value, dtype, like.device)
    view = _VIEWS.get(key + (length,))
    if view is not None:
        return view
    cached = _CACHE.get(key)
    if cached is not None and len(cached) >= length:
        view = _VIEWS[key + (length,)] = cached[:length]
        return view
    fresh = torch.full((length,), value, dtype=dtype, device=like.device)
    if _may_cache(like):
        if cached is not None:
            _REPLACED.append(cached)
        _CACHE[key] = fresh
    return fresh


def _may_cache(like: Tensor) -> bool:
    """Whether a constant made now for ``like``'s device comes from memory that no CUDA graph reuses."""
    if not like.is_cuda:
        return True
    return (not torch.cuda.is_current_stream_capturing()
            and torch.cuda.current_stream(like.device) == torch.cuda.default_stream(like.device))
