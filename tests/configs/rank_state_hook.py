"""Test helper hooks: every process saves its model weights, and the losses, gradient norm and images of each step.

DDP keeps one replica per process; comparing the files of all ranks shows whether the replicas stayed identical and
whether the ranks together trained on the same global batches, with the same losses, as a single process.
Registered in MMSegmentation's HOOKS when a config lists this module in ``custom_imports``.
"""
import json
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


@HOOKS.register_module()
class SaveRankIterationsHook(Hook):
    """Write ``rank<r>_iters.json``: per iteration this process's losses, the gradient norm and its image file names.

    The logger shows only rank 0's losses, each a mean over that rank's share of the global batch. The gradient norm
    (logged by MMEngine when the optimizer wrapper clips) is taken after DDP averaged the gradients of all ranks.
    """

    def before_train(self, runner) -> None:
        self.iterations = []

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.iterations.append(
            dict(losses={name: float(value) for name, value in outputs.items() if 'loss' in name},
                 grad_norm=runner.message_hub.get_scalar('train/grad_norm').current(),
                 images=[osp.basename(sample.img_path) for sample in data_batch['data_samples']]))

    def after_train(self, runner) -> None:
        with open(osp.join(runner.work_dir, f'rank{get_rank()}_iters.json'), 'w') as f:
            json.dump(self.iterations, f)
