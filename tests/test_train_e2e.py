"""Training and evaluation end to end on a generated ADE20K-layout folder, through the tools as users run them.

A tiny ViL UperNet (tests/configs/upernet_vil-tiny_synthetic-64x64.py, derived from the ViL-T config) is trained with
tools/train.py, killed after its first checkpoint, resumed, and evaluated with tools/test.py. The full ViL-T ADE20K
config then trains one step (small crops) through the same package API the tools use.
"""
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from e2e_helpers import ROOT, TINY_CONFIG, data_root_options, make_ade20k, run_tool, tool_env
from PIL import Image

from mmseg_vil.engine import load_config, run_train
from mmseg_vil.engine.work_dir import latest_checkpoint

TRAIN_LOG = re.compile(r'Iter\(train\) \[\s*(\d+)/\s*(\d+)\]\s+base_lr: (\S+)')


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
    return make_ade20k(str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016'))


def kill_after_first_checkpoint(args, log_path: str, timeout: float = 300) -> None:
    """Start a training run and kill it (SIGKILL, no clean-up) as soon as a checkpoint exists."""
    work_dir = args[args.index('--work-dir') + 1]
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=tool_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while latest_checkpoint(work_dir) is None:
                assert proc.poll() is None, f'training ended before its first checkpoint:\n{open(log_path).read()}'
                assert time.monotonic() < deadline, 'no checkpoint within the timeout'
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()


def warmup_lr(iteration: int, cfg) -> float:
    """The base lr the schedule's LinearLR warm-up gives the ``iteration``-th (1-based) step."""
    warmup = cfg.param_scheduler[0]
    progress = (iteration - 1) / (warmup.end - warmup.begin)
    return cfg.optim_wrapper.optimizer.lr * (warmup.start_factor + (1 - warmup.start_factor) * progress)


def test_train_interrupt_resume_and_test(ade_root, tmp_path):
    work = str(tmp_path / 'work')
    data = data_root_options(ade_root)

    kill_after_first_checkpoint(
        ['tools/train.py', TINY_CONFIG, '--work-dir', work, '--cfg-options', *data, 'train_cfg.max_iters=1000',
         'train_cfg.val_interval=1000'], str(tmp_path / 'interrupted.log'))
    interrupted_at = int(re.search(r'iter_(\d+)\.pth$', latest_checkpoint(work)).group(1))
    assert interrupted_at >= 2 and interrupted_at % 2 == 0  # the tiny config saves every 2 iterations

    target = interrupted_at + 2
    log = run_tool(['tools/train.py', TINY_CONFIG, '--work-dir', work, '--resume', '--cfg-options', *data,
                    f'train_cfg.max_iters={target}'])
    assert f'resumed epoch: 0, iter: {interrupted_at}' in log
    steps = [(int(i), int(n), float(lr)) for i, n, lr in TRAIN_LOG.findall(log)]
    assert [(i, n) for i, n, _ in steps] == [(interrupted_at + 1, target), (target, target)]
    # The lr schedule continues from the checkpoint; a restarted warm-up would be at 1e-6 of it.
    cfg = load_config(TINY_CONFIG)
    assert steps[0][2] == pytest.approx(warmup_lr(interrupted_at + 1, cfg), rel=1e-2)
    final = latest_checkpoint(work)
    assert osp.basename(final) == f'iter_{target}.pth'
    checkpoint = torch.load(final, map_location='cpu', weights_only=True)
    assert checkpoint['meta']['iter'] == target

    out_dir, vis_dir, test_dir = (str(tmp_path / name) for name in ('preds', 'vis', 'test'))
    log = run_tool(['tools/test.py', TINY_CONFIG, final, '--work-dir', test_dir, '--out', out_dir, '--show-dir',
                    vis_dir, '--cfg-options', *data])
    printed = float(re.search(r'^mIoU: (\d+\.\d+)$', log, re.MULTILINE).group(1))
    metrics_path = re.search(r'^Test metrics saved to (\S+)$', log, re.MULTILINE).group(1)
    assert osp.dirname(osp.dirname(metrics_path)) == test_dir  # the run's own timestamped folder
    with open(metrics_path) as f:
        report = json.load(f)
    assert report['checkpoint'] == final
    assert report['metrics']['mIoU'] == pytest.approx(printed, abs=0.005)
    assert 0.0 <= printed <= 100.0 and set(report['metrics']) >= {'aAcc', 'mIoU', 'mAcc'}
    for name in ('ADE_val_00000001', 'ADE_val_00000002'):
        prediction = np.asarray(Image.open(osp.join(out_dir, name + '.png')))
        label = np.asarray(Image.open(osp.join(ade_root, 'annotations', 'validation', name + '.png')))
        assert prediction.shape == label.shape and prediction.max() <= 150  # dataset label values, full size
    drawn = [f for _, _, files in os.walk(vis_dir) for f in files if f.endswith('.png')]
    assert len(drawn) == 2


def test_full_vil_t_ade20k_config_trains_one_step(ade_root, tmp_path):
    """The shipped ViL-T config, untouched except data root, batch, crop size and length."""
    crop = (64, 64)
    options = {f'{loader}.dataset.data_root': ade_root for loader in ('train_dataloader', 'val_dataloader')}
    options.update({
        'model.backbone.init_cfg': None,  # no ImageNet checkpoint here
        'model.data_preprocessor.size': crop,
        'train_dataloader.dataset.pipeline.3.crop_size': crop,
        'train_dataloader.batch_size': 2,
        'train_dataloader.num_workers': 0,
        'train_dataloader.persistent_workers': False,
        'train_cfg.max_iters': 1,
        'train_cfg.val_begin': 2,  # no validation of 512x512 slides on CPU
        'default_hooks.checkpoint.save_last': False,
    })
    cfg = load_config(osp.join(ROOT, 'configs/vil/upernet_vil-t16_1xb16-160k_ade20k-512x512.py'), str(tmp_path),
                      options)
    assert cfg.train_dataloader.dataset.pipeline[3].type == 'RandomCrop'
    runner = run_train(cfg)
    assert runner.iter == 1
    assert math.isfinite(runner.message_hub.get_scalar('train/loss').current())
    backbone = runner.model.backbone
    assert type(backbone).__name__ == 'ViL' and len(backbone.layers) == 24
    assert tuple(backbone.pos_embed.shape) == (1, 32, 32, 192)  # img_size 512
    assert type(runner.optim_wrapper.optimizer).__name__ == 'AdamW'
    # the embeddings' scale in the official recipe (tests/data/spec_excerpts.md, vil_spec §7)
    assert min(g['lr_scale'] for g in runner.optim_wrapper.optimizer.param_groups) == pytest.approx(0.65**13)
