"""mLSTM cell backends behind one function.

``mlstm(q, k, v, igate, fgate, backend=...)`` computes the Vision-LSTM matrix-memory cell (vil_spec.md §2.6) with
``q, k, v`` of shape ``(B, NH, N, DH)`` and gate pre-activations of shape ``(B, NH, N)``. Every backend computes the
same function (and the same gradients); they differ in speed and memory.
"""
from typing import Callable, Dict

from torch import Tensor

from .parallel import mlstm_parallel

MLSTM_BACKENDS: Dict[str, Callable[..., Tensor]] = {'parallel': mlstm_parallel, 'auto': mlstm_parallel}


def mlstm(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, backend: str = 'parallel') -> Tensor:
    """Run the mLSTM cell with the named backend (see ``MLSTM_BACKENDS``)."""
    try:
        fn = MLSTM_BACKENDS[backend]
    except KeyError:
        raise ValueError(f'Unknown mLSTM backend {backend!r}; available: {sorted(MLSTM_BACKENDS)}') from None
    return fn(q, k, v, igate, fgate)


__all__ = ['MLSTM_BACKENDS', 'mlstm', 'mlstm_parallel']
