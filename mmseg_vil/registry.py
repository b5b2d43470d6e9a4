"""One decorator that registers a model class in every OpenMMLab registry this package serves.

Backbones must be buildable from MMSegmentation configs (``default_scope='mmseg'``) and from MMPretrain configs
(``default_scope='mmpretrain'``). Registering explicitly in both avoids relying on MMEngine's parent-registry lookup.
MMPretrain is optional: without it only the MMSegmentation registry is used.
"""
from typing import TypeVar

from mmseg.registry import MODELS as MMSEG_MODELS

try:
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
except ImportError:  # mmpretrain is the optional "cls" extra
    MMPRETRAIN_MODELS = None

T = TypeVar('T', bound=type)


def register_model(cls: T) -> T:
    """Register ``cls`` under its class name in the MMSegmentation and (if installed) MMPretrain MODELS."""
    MMSEG_MODELS.register_module(module=cls)
    if MMPRETRAIN_MODELS is not None:
        MMPRETRAIN_MODELS.register_module(module=cls)
    return cls
