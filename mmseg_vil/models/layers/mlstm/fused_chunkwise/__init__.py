"""Chunkwise (state-passing) Triton mLSTM: the parallel cell's exact function and gradients in linear time.

Laid out like flash-linear-attention's ``ops/``: ``scans`` (gate scans and the exact max stabiliser, with the math),
``tiles`` (strided token tiles and state buffers), ``forward`` (3 launches), ``backward`` (7 launches) and ``op``
(the torch.library custom ops and :func:`mlstm_fused_chunkwise`).
"""
from .op import mlstm_fused_chunkwise

__all__ = ['mlstm_fused_chunkwise']
