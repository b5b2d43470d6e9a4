"""Data-parallel training on CPU (torchrun + gloo, tools/dist_train.sh) computes what one process computes; the
processes of dist_train.sh / dist_test.sh run the project's interpreter and end cleanly (process group destroyed).

The same global batch of 4 images is trained as 1x4 (one process, no DDP), 2x2 and 4x1 with the same seed. Every rank
saves its weights and, per iteration, its losses, the gradient norm and the names of its images
(tests/configs/rank_state_hook.py); benchmarks/multi_gpu_compare.py compares the runs, as it does for the GPU runs of
benchmarks/multi_gpu.sh. The config removes what legitimately depends on the split (see its header).
"""
import importlib.util
import os
import os.path as osp
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as torch_dist
from e2e_helpers import ROOT, data_root_options, free_port, make_ade20k, run_command, run_commands, tool_env
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch.nn.modules.batchnorm import _BatchNorm

from mmseg_vil.engine import CPUDistributedDataParallel, destroy_process_group

# benchmarks/multi_gpu_compare.py: the comparison that benchmarks/multi_gpu.sh runs on GPUs, here on CPU processes.
_spec = importlib.util.spec_from_file_location('multi_gpu_compare',
                                               osp.join(ROOT, 'benchmarks', 'multi_gpu_compare.py'))
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

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

    # The reference is not trivial: distinct images per step, another batch each step, the weights move.
    steps = compare.load_steps(work_dirs[1])[1]
    assert [step['iteration'] for step in steps] == [1, 2, 3, 4]
    assert all(len(set(step['images'])) == GLOBAL_BATCH for step in steps)
    assert steps[0]['images'] != steps[1]['images']
    before, after = (torch.load(osp.join(work_dirs[1], f'rank0_{stage}.pth'), weights_only=True)
                     for stage in ('before', 'after'))
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 100 * WEIGHT_ATOL

    for world_size in WORLD_SIZES[1:]:
        # Per iteration the same images, global loss and gradient norm; final weights within WEIGHT_ATOL.
        assert compare.main(['equal', work_dirs[1], work_dirs[world_size], '--rtol', str(LOSS_RTOL),
                             '--weight-atol', str(WEIGHT_ATOL)]) == 0, f'{world_size} processes: see the table'
        for rank in range(world_size):
            rank_before, rank_after = (torch.load(osp.join(work_dirs[world_size], f'rank{rank}_{stage}.pth'),
                                                  weights_only=True) for stage in ('before', 'after'))
            if rank == 0:
                first_after = rank_after
            for key in after:
                assert torch.equal(rank_before[key], before[key]), (world_size, rank, key)  # the same start
                assert torch.equal(rank_after[key], first_after[key]), (world_size, rank, key)  # identical replicas


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


def test_destroy_process_group_ends_the_group(tmp_path):
    assert not torch.distributed.is_initialized()
    destroy_process_group()  # nothing to do
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    destroy_process_group()
    assert not torch.distributed.is_initialized()


def _thread_count() -> int:
    return len(os.listdir('/proc/self/task'))


@pytest.mark.skipif(not torch_dist.is_gloo_available() or not osp.isdir('/proc/self/task'),
                    reason='needs gloo and /proc')
def test_destroy_process_group_joins_gloo_threads_held_by_a_cycle(tmp_path):
    """A finished Runner keeps its DDP wrapper, and so the group, in reference cycles; destroying the group must
    still stop gloo's worker threads (alive into interpreter teardown, they abort the process now and then)."""
    before = _thread_count()
    torch_dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    model = CPUDistributedDataParallel(torch.nn.Linear(2, 2))
    cycle = [model]
    cycle.append(cycle)  # as a Runner and its hooks refer to each other
    assert _thread_count() > before
    del model, cycle
    destroy_process_group()
    assert _thread_count() == before


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason='PyTorch built without gloo')
def test_dist_test_runs_end_cleanly(tmp_path):
    """A 2-process evaluation through tools/check_dist_test.py (which runs 20 of them outside CI): exit status 0,
    metrics printed, no abort at exit."""
    log = run_command([sys.executable, 'tools/check_dist_test.py', '--runs', '1', '--procs', '2', '--work-dir',
                       str(tmp_path)])
    assert 'run 1/1: clean' in log and '1 of 1 runs of 2 processes ended cleanly' in log


@pytest.mark.parametrize('script, args', [('dist_test.sh', ['CONFIG', 'CKPT', '2']),
                                          ('dist_train.sh', ['CONFIG', '2'])])
def test_dist_scripts_use_the_project_environment(tmp_path, script, args):
    """Without $PYTHON the scripts run .venv/bin/python of the repository (a stub here that records its call)."""
    tools = tmp_path / 'tools'
    tools.mkdir()
    for name in (script, 'dist_launch.sh'):
        shutil.copy(osp.join(ROOT, 'tools', name), tools)
    stub = tmp_path / '.venv' / 'bin' / 'python'
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/usr/bin/env bash\necho "$0 $*" > "$(dirname "$0")/called"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
    subprocess.run(['bash', str(tools / script), *args], check=True, env=env)
    called = (stub.parent / 'called').read_text()
    assert called.startswith(f'{stub} -m torch.distributed.run ') and '--nproc_per_node=2' in called
    assert '--launcher pytorch' in called
