"""Test helper hook: every process saves its model weights before and after training.

DDP keeps one replica per process; comparing the files of all ranks shows whether the replicas stayed identical.
Registered in MMSegmentation's HOOKS when a config lists this module in ``custom_imports``.
"""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS


@HOOKS.register_module()
class SaveRankStateHook(Hook):
    """Write ``rank<r>_{before,after}.pth`` (the unwrapped model's state dict) into the work dir."""

    def _save(self, runner, stage: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        torch.save(model.state_dict(), osp.join(runner.work_dir, f'rank{get_rank()}_{stage}.pth'))

    def before_train(self, runner) -> None:
        self._save(runner, 'before')

    def after_train(self, runner) -> None:
        self._save(runner, 'after')
