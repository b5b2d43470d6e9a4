"""mLSTM cell backends behind one function.

``mlstm(q, k, v, igate, fgate, backend=..., reverse=False)`` computes the Vision-LSTM matrix-memory cell
(vil_spec.md §2.6) with ``q, k, v`` of shape ``(B, NH, N, DH)`` and gate pre-activations of shape ``(B, NH, N)``;
``reverse`` runs it from the last token to the first (the official reverse blocks' flipped sequence), natively in
the backends of ``REVERSIBLE_BACKENDS`` and by flipping inputs and output in the others. Every backend computes the
same function with the same (full autograd) gradients; they differ in speed and memory:

* ``parallel``: the official quadratic form, O(N^2) memory; fastest on CPU for short sequences.
* ``chunkwise``: pure PyTorch, memory linear in N; any device.
* ``fused``: our quadratic Triton kernels (flash-attention-like), CUDA only (or any device under
  ``TRITON_INTERPRET=1``); registered when Triton imports.
* ``fused_chunkwise``: our chunkwise (state-passing) Triton kernels, linear in N; same devices as ``fused``.
* ``auto``: the fastest accurate one for the device, dtype, head dim and sequence length.
"""
from typing import Callable, Dict

import torch
from torch import Tensor

from .chunkwise import mlstm_chunkwise
from .parallel import mlstm_parallel

try:
    from .fused import mlstm_fused
    from .fused_chunkwise import mlstm_fused_chunkwise
except ImportError:  # no Triton
    mlstm_fused = mlstm_fused_chunkwise = None

# Choices of 'auto', from CPU timings (mlstm_kernels.md §4) and H200 timings (benchmarks/mlstm_kernel_notes.md).
# The quadratic form is the fastest torch backend for short sequences and float32/64 (in half precision it loses
# accuracy: scores and normaliser in half precision); float32 runs the fused kernels as 3xTF32, which beats the torch
# backends only for moderate head dims and lengths.
PARALLEL_MAX_LEN = 256
FUSED_FLOAT32_MAX_HEAD_DIM = 192
FUSED_FLOAT32_MAX_LEN = 4096
# From this many steps the chunkwise Triton cell beats the quadratic one in half precision (ViL-T training step, H100,
# CUDA graphs, 2026-12-07: 63.7 vs 84.1 ms at 4096 tokens, 66.9 vs 228.6 ms at 16384); below, the quadratic one wins
# (2026-12-08: 45.8 vs 43.2 ms at 1024 tokens, batch 32; 21.4 vs 15.6 ms at 196, batch 64).
FUSED_CHUNKWISE_MIN_LEN = 4096


def _auto_backend(q: Tensor) -> str:
    n, head_dim = q.shape[-2:]
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and mlstm_fused is not None and half and n >= FUSED_CHUNKWISE_MIN_LEN:
        return 'fused_chunkwise'
    if q.is_cuda and mlstm_fused is not None and (
            half or (q.dtype == torch.float32 and head_dim <= FUSED_FLOAT32_MAX_HEAD_DIM and n <= FUSED_FLOAT32_MAX_LEN)):
        return 'fused'
    if n < PARALLEL_MAX_LEN and q.dtype in (torch.float32, torch.float64):
        return 'parallel'
    return 'chunkwise'


def resolve_backend(backend: str, q: Tensor) -> str:
    """The backend that ``backend`` runs for cell inputs like ``q (B, NH, N, DH)`` (``'auto'`` resolved)."""
    return _auto_backend(q) if backend == 'auto' else backend


def mlstm_auto(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, reverse: bool = False) -> Tensor:
    """The fastest accurate backend for the device, dtype, head dim and sequence length."""
    return mlstm(q, k, v, igate, fgate, backend=_auto_backend(q), reverse=reverse)


def _flip_tokens(x: Tensor) -> Tensor:
    return x.flip(-2 if x.dim() == 4 else -1)


MLSTM_BACKENDS: Dict[str, Callable[..., Tensor]] = {
    'parallel': mlstm_parallel,
    'chunkwise': mlstm_chunkwise,
    'auto': mlstm_auto,
}
if mlstm_fused is not None:
    MLSTM_BACKENDS['fused'] = mlstm_fused
    MLSTM_BACKENDS['fused_chunkwise'] = mlstm_fused_chunkwise
# Backends that take ``reverse`` themselves (by index arithmetic or inside a copy they make anyway).
REVERSIBLE_BACKENDS = {'chunkwise', 'auto', 'fused', 'fused_chunkwise'}


def mlstm(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, backend: str = 'parallel',
          reverse: bool = False) -> Tensor:
    """Run the mLSTM cell with the named backend (see ``MLSTM_BACKENDS``), causally or from the last token."""
    try:
        fn = MLSTM_BACKENDS[backend]
    except KeyError:
        raise ValueError(f'Unknown mLSTM backend {backend!r}; available: {sorted(MLSTM_BACKENDS)}') from None
    if backend in REVERSIBLE_BACKENDS:
        return fn(q, k, v, igate, fgate, reverse=reverse)
    if reverse:
        return _flip_tokens(fn(*(_flip_tokens(x) for x in (q, k, v, igate, fgate))))
    return fn(q, k, v, igate, fgate)


__all__ = ['MLSTM_BACKENDS', 'REVERSIBLE_BACKENDS', 'mlstm', 'mlstm_auto', 'mlstm_chunkwise', 'mlstm_fused',
           'mlstm_fused_chunkwise', 'mlstm_parallel', 'resolve_backend']
