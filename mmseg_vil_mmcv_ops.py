# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""A pure-PyTorch ``mmcv.ops`` for installations with mmcv-lite, which lacks the compiled ``mmcv._ext``.

MMSegmentation imports a few ops unconditionally (``point_sample``, ``sigmoid_focal_loss``), so with mmcv-lite even
``from mmseg.apis import MMSegInferencer`` fails with "No module named 'mmcv._ext'". :func:`install` puts a finder
on ``sys.meta_path`` that, only while ``mmcv._ext`` is absent, answers ``import mmcv.ops`` with a stand-in package:

* ``point_sample`` works (bilinear ``grid_sample``); every other op is absent: ``hasattr`` is False, ``getattr``
  with a default returns it, and using, importing (``from mmcv.ops import nms``, ``import mmcv.ops.nms``) or
  building one (``dict(type='DCNv2')`` in a config) raises ``ModuleNotFoundError`` saying that full mmcv is needed;
* it is a package with a module spec, as the real one, so ``importlib.util.find_spec`` answers about it.

A full mmcv (with ``_ext``) is never touched. This is a top-level module, not part of ``mmseg_vil``, so that
``mmseg_vil_mmcv_ops.pth`` can install it at interpreter start without importing PyTorch: the documented MMSeg APIs
then work in any order of imports. ``import mmseg_vil`` installs it too (:mod:`mmseg_vil.compat`).
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

OPS = 'mmcv.ops'
FULL_MMCV_HINT = ('it needs the compiled ops of full mmcv (mmcv._ext), but only mmcv-lite is installed; '
                  'install full mmcv 2.1.0 built for your torch (see the mmseg-vil README, "Full mmcv")')
# What full mmcv registers in MMEngine's MODELS when mmcv.ops is imported; configs name them, e.g. dcn=dict(type='DCN').
REGISTERED_OPS = ('DCN', 'DCNv2', 'SAC', 'carafe', 'CrissCrossAttention', 'MultiScaleDeformableAttention', 'MMSyncBN',
                  'SparseConv2d', 'SparseConv3d', 'SparseConv4d', 'SparseConvTranspose2d', 'SparseConvTranspose3d',
                  'SparseInverseConv2d', 'SparseInverseConv3d', 'SubMConv2d', 'SubMConv3d', 'SubMConv4d')


def has_mmcv_ext() -> bool:
    """Whether the installed mmcv carries its compiled ops."""
    try:
        return importlib.util.find_spec('mmcv._ext') is not None
    except ModuleNotFoundError:  # mmcv itself is missing
        return False


def missing_op_error(name: str) -> ModuleNotFoundError:
    # name='mmcv._ext' (not the op's module) keeps importlib from mistaking it for an absent optional submodule.
    return ModuleNotFoundError(f'{OPS}.{name}: {FULL_MMCV_HINT}', name='mmcv._ext')


def missing_op(name: str):
    """A stand-in for the op ``name`` that raises the full-mmcv hint when called or built."""

    def op(*args, **kwargs):
        raise missing_op_error(name)

    op.__name__ = op.__qualname__ = name
    return op


def point_sample(input, points, align_corners: bool = False, **kwargs):
    """Sample ``input`` (N, C, H, W) at ``points`` (N, P, 2) or (N, Hp, Wp, 2) given in [0, 1] x [0, 1].

    Same contract as ``mmcv.ops.point_sample``: points are normalised (x, y) coordinates; bilinear
    ``grid_sample`` after mapping them to [-1, 1].
    """
    import torch.nn.functional as F

    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if add_dim else output


def _absent_attribute(name: str):
    if name.startswith('__'):
        raise AttributeError(name)
    raise AttributeError(f'{OPS}.{name} is not available: {FULL_MMCV_HINT}', name=name)


def _register_missing_ops() -> None:
    """Register :data:`REGISTERED_OPS` in MMEngine's MODELS, so that a config naming one gets the hint."""
    try:
        from mmengine.registry import MODELS
    except ImportError:
        return
    for name in REGISTERED_OPS:
        if name not in MODELS.module_dict:
            MODELS.register_module(name=name, module=missing_op(name))


class MmcvOpsStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finder and loader of the stand-in ``mmcv.ops`` (see the module docstring)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == OPS:
            if has_mmcv_ext():
                return None
            return importlib.machinery.ModuleSpec(OPS, self, origin='mmseg_vil_mmcv_ops', is_package=True)
        if fullname.startswith(OPS + '.') and is_stand_in(sys.modules.get(OPS)):
            raise missing_op_error(fullname[len(OPS) + 1:])
        return None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        module.__doc__ = 'mmseg_vil stand-in for mmcv.ops under mmcv-lite: point_sample only (see mmseg_vil_mmcv_ops).'
        module.MMSEG_VIL_FALLBACK = True
        module.point_sample = point_sample
        # mmseg.models.losses.focal_loss imports this name unconditionally and uses it only on CUDA.
        module.sigmoid_focal_loss = missing_op('sigmoid_focal_loss')
        module.__getattr__ = _absent_attribute
        _register_missing_ops()


def is_stand_in(module) -> bool:
    return getattr(module, 'MMSEG_VIL_FALLBACK', False)


def install() -> None:
    """Put the stand-in's finder first on ``sys.meta_path`` (once); it acts only while ``mmcv._ext`` is absent."""
    if not any(isinstance(finder, MmcvOpsStandIn) for finder in sys.meta_path):
        sys.meta_path.insert(0, MmcvOpsStandIn())
