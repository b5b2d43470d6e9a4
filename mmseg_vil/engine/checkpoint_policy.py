# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""The checkpoint policy of :mod:`mmseg_vil.utils.checkpoint` on whole-model checkpoints and MMEngine's Runner.

:func:`load_model_checkpoint` is the way the APIs (inference, comparison) load a trained model;
:class:`CheckpointPolicyHook` applies the same policy to a Runner's ``load_from`` and ``resume``, which MMEngine loads
with ``strict=False``: it inspects the checkpoint in ``after_load_checkpoint``, before the Runner copies it into the
model and before any training or evaluation step, and either hands on exactly what may be loaded or stops the run.
"""
from mmengine.hooks import Hook
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ..utils.checkpoint import checked_state_dict, load_state_dict_strictly, read_checkpoint, state_dict_tensors


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model whose keys a checkpoint holds: without DDP-style wrappers or a test-time-augmentation wrapper."""
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def load_model_checkpoint(model: nn.Module, path: str, allow_partial: bool = False) -> dict:
    """Load a whole-model checkpoint file into ``model`` under the policy; return the checkpoint's ``meta``."""
    state_dict, meta = read_checkpoint(path)
    load_state_dict_strictly(unwrap_model(model), state_dict, source=path, allow_partial=allow_partial)
    return meta


@HOOKS.register_module()
class CheckpointPolicyHook(Hook):
    """Refuse a ``load_from`` / ``resume`` checkpoint that does not fit the model (or, with ``allow_partial``, pass
    on only its matching tensors). Added to every run of ``tools/train.py`` and ``tools/test.py``; any MMEngine
    config can list it in ``custom_hooks``.
    """

    priority = 'VERY_LOW'  # after hooks that edit the loaded checkpoint themselves

    def __init__(self, allow_partial: bool = False, source: str = 'the load_from / resume checkpoint') -> None:
        self.allow_partial = allow_partial
        self.source = source

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        bare = 'state_dict' not in checkpoint  # MMEngine then loads the whole dict as the state dict
        allowed = checked_state_dict(unwrap_model(runner.model),
                                     state_dict_tensors(checkpoint if bare else checkpoint['state_dict']),
                                     self.source, self.allow_partial)
        if bare:
            checkpoint.clear()
            checkpoint.update(allowed)
        else:
            checkpoint['state_dict'] = allowed
