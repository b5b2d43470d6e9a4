"""Data-parallel training on CPU (torchrun + gloo, tools/dist_train.sh) computes what one process computes.

The same global batch of 4 images is trained as 1x4 (one process, no DDP), 2x2 and 4x1 with the same seed. Every rank
saves its weights and, per iteration, its losses, the gradient norm and the names of its images
(tests/configs/rank_state_hook.py). The config removes what legitimately depends on the split (see its header).
"""
import json
import os
import os.path as osp
import sys
import tempfile

import pytest
import torch
import torch.distributed as torch_dist
from e2e_helpers import ROOT, data_root_options, free_port, make_ade20k, run_commands, tool_env
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch.nn.modules.batchnorm import _BatchNorm

from mmseg_vil.engine import CPUDistributedDataParallel

DDP_CONFIG = osp.join(ROOT, 'tests', 'configs', 'upernet_vil-tiny_synthetic-64x64_cpu-ddp.py')
GLOBAL_BATCH = 4
WORLD_SIZES = (1, 2, 4)
# Float32 sums in another order (batch 4 vs 2 vs 1 in the kernels, gloo's all-reduce) differ by a few ulps; for the
# losses and the gradient norm, sums over 4 x 64 x 64 pixels, 1e-5 is about 100 ulps (measured: <= 1.1e-7). The
# weights move by up to 2e-3 in the 4 AdamW steps of lr 5e-4; they may differ by 2e-5, 4% of one step (measured:
# <= 1.3e-6).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5
# The tiny ones; S and B differ in widths and drop path only (DropPath masks samples: every parameter stays in use).
SHIPPED_CONFIGS = [
    'vil/upernet_vil-t16_1xb16-160k_ade20k-512x512.py',
    'vit/upernet_deit-t16_1xb16-160k_ade20k-512x512.py',
    'vim/upernet_vim-t16_1xb16-160k_ade20k-512x512.py',
]


def _train(tmp_path, data_root: str) -> dict:
    """Run the three splits side by side; ``{world_size: work_dir}``."""
    # tests/configs on the path for the config's custom import of the hooks; one thread per process on a small CPU.
    python_path = os.pathsep.join(filter(None, [osp.join(ROOT, 'tests', 'configs'), os.environ.get('PYTHONPATH')]))
    commands, work_dirs = [], {}
    for world_size in WORLD_SIZES:
        work_dirs[world_size] = str(tmp_path / f'work{world_size}')
        options = ['--work-dir', work_dirs[world_size], '--cfg-options', *data_root_options(data_root),
                   f'train_dataloader.batch_size={GLOBAL_BATCH // world_size}']
        launch = ([sys.executable, 'tools/train.py', DDP_CONFIG] if world_size == 1 else
                  ['bash', 'tools/dist_train.sh', DDP_CONFIG, str(world_size)])
        env = tool_env(PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS='1', PYTHONPATH=python_path)
        commands.append((launch + options, env))
    for log in run_commands(commands):
        assert 'Iter(train) [4/4]' in log
    return work_dirs


@pytest.mark.skipif(not torch_dist.is_gloo_available(), reason='PyTorch built without gloo')
def test_one_two_four_processes_train_alike(tmp_path):
    data_root = make_ade20k(str(tmp_path / 'ADEChallengeData2016'), num_train=8)  # two global batches per pass
    work_dirs = _train(tmp_path, data_root)

    def rank_files(world_size: int, name: str) -> list:
        return [osp.join(work_dirs[world_size], f'rank{rank}_{name}') for rank in range(world_size)]

    def iterations(world_size: int) -> list:
        """Per iteration: the global loss (ranks' mean), rank 0's gradient norm, the set of the ranks' images."""
        ranks = [json.load(open(path)) for path in rank_files(world_size, 'iters.json')]
        steps = list(zip(*ranks))
        assert len(steps) == 4
        for step in steps:  # the all-reduced gradient is the same on every rank
            assert len({rank['grad_norm'] for rank in step}) == 1
        return [(sum(rank['losses']['loss'] for rank in step) / world_size, step[0]['grad_norm'],
                 sorted(image for rank in step for image in rank['images'])) for step in steps]

    reference = iterations(1)
    assert all(len(images) == len(set(images)) == GLOBAL_BATCH for _, _, images in reference)
    assert reference[0][2] != reference[1][2]  # the data order matters for the comparison
    weights_before = torch.load(rank_files(1, 'before.pth')[0], weights_only=True)
    weights_after = torch.load(rank_files(1, 'after.pth')[0], weights_only=True)
    moved = max((weights_after[k] - weights_before[k]).abs().max().item() for k in weights_after)
    assert moved > 100 * WEIGHT_ATOL, 'the weights barely changed; the comparison would be vacuous'

    for world_size in WORLD_SIZES[1:]:
        for step, ((loss, grad_norm, images), (ref_loss, ref_grad_norm, ref_images)) in enumerate(
                zip(iterations(world_size), reference)):
            where = f'{world_size} processes, iteration {step + 1}'
            assert images == ref_images, where
            assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), where
            assert grad_norm == pytest.approx(ref_grad_norm, rel=LOSS_RTOL), where
        replicas = [torch.load(path, weights_only=True) for path in rank_files(world_size, 'after.pth')]
        for rank, path in enumerate(rank_files(world_size, 'before.pth')):
            before = torch.load(path, weights_only=True)
            for key, value in weights_after.items():
                where = f'{world_size} processes, rank {rank}, {key}'
                assert torch.equal(before[key], weights_before[key]), where  # the same start
                assert torch.equal(replicas[rank][key], replicas[0][key]), where  # replicas stay bitwise equal
                torch.testing.assert_close(replicas[rank][key], value, rtol=0, atol=WEIGHT_ATOL,
                                           msg=lambda message, where=where: f'{where}: {message}')


@pytest.fixture()
def single_process_group():
    """A gloo group of one process: DDP's reducer (and its check for unused parameters) runs as in a real job."""
    with tempfile.TemporaryDirectory() as tmp:
        torch_dist.init_process_group('gloo', init_method=f'file://{osp.join(tmp, "store")}', rank=0, world_size=1)
        try:
            yield
        finally:
            torch_dist.destroy_process_group()


def _segmentation_batch(num_classes: int, size: int = 64) -> dict:
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, size, size)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in samples],
                data_samples=samples)


@pytest.mark.skipif(not torch_dist.is_gloo_available(), reason='PyTorch built without gloo')
@pytest.mark.parametrize('config', SHIPPED_CONFIGS)
def test_shipped_configs_use_every_parameter(config, single_process_group):
    """find_unused_parameters=False (MMEngine's default, ours) is right: every parameter gets a gradient each step.

    Also: on CPU the wrapper turns the configs' SyncBN into BN.
    """
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.size = (64, 64)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = CPUDistributedDataParallel(MODELS.build(cfg.model), find_unused_parameters=False)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert any(isinstance(m, _BatchNorm) for m in model.modules())
    received = set()
    for name, param in model.module.named_parameters():
        param.register_post_accumulate_grad_hook(lambda _, name=name: received.add(name))
    optim_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
    for _ in range(2):  # DDP raises in the second step if the first left a parameter without gradient
        received.clear()
        model.train_step(_segmentation_batch(cfg.model.decode_head.num_classes), optim_wrapper)
        assert received == {name for name, p in model.module.named_parameters() if p.requires_grad}
