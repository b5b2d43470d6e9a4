"""Helper hooks for checking data-parallel runs: every process saves its weights and a record of every step.

DDP keeps one replica per process; comparing the files of all ranks shows whether the replicas stayed identical and
whether the ranks together trained on the same global batches, with the same losses, as a single process. Used by
tests/test_distributed.py and benchmarks/multi_gpu.sh; registered in MMSegmentation's HOOKS when a config lists this
module in ``custom_imports`` (with tests/configs on the Python path).
"""
import json
import os.path as osp
import time

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS


def _unwrapped(runner) -> torch.nn.Module:
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


@HOOKS.register_module()
class SaveRankStateHook(Hook):
    """Write ``rank<r>_{before,after}.pth`` (the unwrapped model's state dict) into the work dir."""

    def _save(self, runner, stage: str) -> None:
        torch.save(_unwrapped(runner).state_dict(), osp.join(runner.work_dir, f'rank{get_rank()}_{stage}.pth'))

    def before_train(self, runner) -> None:
        self._save(runner, 'before')

    def after_train(self, runner) -> None:
        self._save(runner, 'after')


@HOOKS.register_module()
class SaveRankIterationsHook(Hook):
    """Write ``rank<r>_iters.json``: the model's SyncBN layer count and, per iteration, what this process did.

    Per iteration: the iteration number (1-based, so a resumed run continues the count), this process's losses (the
    logger shows rank 0's only, each a mean over that rank's share of the global batch), the learning rate of every
    parameter group, the gradient norm if MMEngine logs one (it does when the optimizer wrapper clips; taken after DDP
    averaged the gradients of all ranks), the file names of this process's images and the time the step ended.
    """

    def before_train(self, runner) -> None:
        self.record = dict(
            sync_bn_layers=sum(isinstance(m, torch.nn.SyncBatchNorm) for m in _unwrapped(runner).modules()),
            iterations=[])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        scalars = runner.message_hub.log_scalars
        self.record['iterations'].append(
            dict(iteration=runner.iter + 1,
                 losses={name: float(value) for name, value in outputs.items() if 'loss' in name},
                 lr=runner.optim_wrapper.get_lr()['lr'],
                 grad_norm=scalars['train/grad_norm'].current() if 'train/grad_norm' in scalars else None,
                 images=[osp.basename(sample.img_path) for sample in data_batch['data_samples']],
                 time=time.perf_counter()))

    def after_train(self, runner) -> None:
        with open(osp.join(runner.work_dir, f'rank{get_rank()}_iters.json'), 'w') as f:
            json.dump(self.record, f)
