"""Make the pinned OpenMMLab stack usable on a plain machine with today's PyTorch. Applied on ``import mmseg_vil``.

1. ``mmcv-lite`` has no compiled ``mmcv._ext``, and ``import mmseg.models`` then fails on a few unconditional
   ``from mmcv.ops import ...`` lines. Only in that case, :func:`install_mmcv_ops_fallback` registers a small
   pure-PyTorch ``mmcv.ops``: ``point_sample`` (via ``grid_sample``) works; any other op raises
   ``ModuleNotFoundError`` telling the user to install full mmcv. A full mmcv is never touched.
2. PyTorch >= 2.6 loads checkpoints with ``weights_only=True``, and MMEngine 0.10.7 resume then fails on its own
   ``HistoryBuffer`` and the NumPy arrays inside it. :func:`allow_mmengine_checkpoint_types` adds exactly those
   types to PyTorch's safe globals; anything else in a checkpoint is still refused by the weights-only unpickler.
   ``HistoryBuffer`` also pickles its class-level statistics functions (as ``builtins.getattr`` calls, which must
   not be allow-listed); :func:`slim_history_buffer_pickles` stops writing them: they are class attributes that
   every process re-creates, and ``HistoryBuffer.__setstate__`` already treats them as optional.
"""
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

FULL_MMCV_HINT = ('it needs the compiled ops of full mmcv (mmcv._ext), but only mmcv-lite is installed; '
                  'install full mmcv 2.1.0 built for your torch (see README, "Full mmcv")')


def has_mmcv_ext() -> bool:
    """Whether the installed mmcv carries its compiled ops."""
    try:
        return importlib.util.find_spec('mmcv._ext') is not None
    except ModuleNotFoundError:  # mmcv itself is missing
        return False


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """Sample ``input`` (N, C, H, W) at ``points`` (N, P, 2) or (N, Hp, Wp, 2) given in [0, 1] x [0, 1].

    Same contract as ``mmcv.ops.point_sample``: points are normalised (x, y) coordinates; bilinear
    ``grid_sample`` after mapping them to [-1, 1].
    """
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if add_dim else output


def _missing_op(name: str):
    def op(*args, **kwargs):
        raise ModuleNotFoundError(f'mmcv.ops.{name}: {FULL_MMCV_HINT}')

    op.__name__ = name
    return op


def _build_fallback_ops() -> types.ModuleType:
    ops = types.ModuleType('mmcv.ops', doc='mmseg_vil fallback for mmcv-lite: point_sample only.')
    ops.MMSEG_VIL_FALLBACK = True
    ops.point_sample = point_sample
    # mmseg.models.losses.focal_loss imports this name unconditionally and uses it only on CUDA.
    ops.sigmoid_focal_loss = _missing_op('sigmoid_focal_loss')

    def __getattr__(name: str):
        if name.startswith('__'):
            raise AttributeError(name)
        raise ModuleNotFoundError(f'mmcv.ops.{name}: {FULL_MMCV_HINT}', name='mmcv.ops')

    ops.__getattr__ = __getattr__
    return ops


def install_mmcv_ops_fallback() -> bool:
    """Register the fallback ``mmcv.ops`` if mmcv lacks ``_ext``; returns whether it was installed."""
    if has_mmcv_ext() or importlib.util.find_spec('mmcv') is None:
        return False
    if not getattr(sys.modules.get('mmcv.ops'), 'MMSEG_VIL_FALLBACK', False):
        import mmcv
        sys.modules['mmcv.ops'] = mmcv.ops = _build_fallback_ops()
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
