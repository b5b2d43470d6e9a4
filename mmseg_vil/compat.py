"""Make the pinned OpenMMLab stack usable on a plain machine with today's PyTorch. Applied on ``import mmseg_vil``.

1. ``mmcv-lite`` has no compiled ``mmcv._ext``, and ``import mmseg.models`` then fails on a few unconditional
   ``from mmcv.ops import ...`` lines. Only in that case, :func:`install_mmcv_ops_fallback` installs the pure-PyTorch
   ``mmcv.ops`` stand-in of :mod:`mmseg_vil_mmcv_ops` (``point_sample`` works; any other op says that full mmcv is
   needed). The package's ``mmseg_vil_mmcv_ops.pth`` installs it at interpreter start as well, for users who import
   ``mmseg`` before ``mmseg_vil``. A full mmcv is never touched.
2. PyTorch >= 2.6 loads checkpoints with ``weights_only=True``, and MMEngine 0.10.7 resume then fails on its own
   ``HistoryBuffer`` and the NumPy arrays inside it. :func:`allow_mmengine_checkpoint_types` adds exactly those
   types to PyTorch's safe globals; anything else in a checkpoint is still refused by the weights-only unpickler.
   ``HistoryBuffer`` also pickles its class-level statistics functions (as ``builtins.getattr`` calls, which must
   not be allow-listed); :func:`slim_history_buffer_pickles` stops writing them: they are class attributes that
   every process re-creates, and ``HistoryBuffer.__setstate__`` already treats them as optional.
"""
import importlib.util

import torch
from mmseg_vil_mmcv_ops import has_mmcv_ext, install


def install_mmcv_ops_fallback() -> bool:
    """Install the ``mmcv.ops`` stand-in if mmcv lacks ``_ext``; returns whether it is in use."""
    if has_mmcv_ext() or importlib.util.find_spec('mmcv') is None:
        return False
    install()
    return True


def mmengine_checkpoint_types() -> list:
    """The non-tensor types MMEngine writes into runner checkpoints (message hub, NumPy scalars and arrays)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core import multiarray as np_multiarray  # NumPy >= 2
    except ImportError:
        from numpy.core import multiarray as np_multiarray

    numpy_types = [np.ndarray, np.dtype, np_multiarray._reconstruct, np_multiarray.scalar]
    numpy_types += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [HistoryBuffer, *numpy_types]


def _history_buffer_state(self) -> dict:
    return {key: value for key, value in self.__dict__.items() if key != 'statistics_methods'}


def slim_history_buffer_pickles() -> None:
    """Pickle ``HistoryBuffer`` without its statistics functions, so weights-only loading accepts it."""
    from mmengine.logging import HistoryBuffer
    HistoryBuffer.__getstate__ = _history_buffer_state


def allow_mmengine_checkpoint_types() -> None:
    """Allow-list MMEngine's own checkpoint types for ``torch.load(weights_only=True)``."""
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(mmengine_checkpoint_types())


def apply() -> None:
    """Apply every compatibility fix; idempotent."""
    install_mmcv_ops_fallback()
    slim_history_buffer_pickles()
    allow_mmengine_checkpoint_types()
