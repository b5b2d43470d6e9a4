"""Data-parallel training and evaluation on CPU: tools/dist_train.sh / dist_test.sh start 2 processes (torchrun,
gloo) with the project's interpreter, and the processes end cleanly (their process group destroyed).

Each rank saves its weights before and after training (tests/configs/rank_state_hook.py). The replicas must end
identical although every rank trained on its own shard of the data, which shows in the per-rank BatchNorm running
statistics (SyncBN, which needs GPUs, becomes per-process BN on CPU).
"""
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch
from e2e_helpers import ROOT, data_root_options, free_port, make_ade20k, run_command, tool_env

from mmseg_vil.engine import destroy_process_group

DDP_CONFIG = osp.join(ROOT, 'tests', 'configs', 'upernet_vil-tiny_synthetic-64x64_cpu-ddp.py')
BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason='PyTorch built without gloo')
def test_two_processes_keep_identical_replicas(tmp_path):
    data_root = make_ade20k(str(tmp_path / 'ADEChallengeData2016'))
    work = str(tmp_path / 'work')
    # tests/configs on the path for the config's custom import of the hook; one thread per process on a small CPU.
    python_path = os.pathsep.join(filter(None, [osp.join(ROOT, 'tests', 'configs'), os.environ.get('PYTHONPATH')]))
    env = tool_env(PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS='1', PYTHONPATH=python_path)
    log = run_command(['bash', 'tools/dist_train.sh', DDP_CONFIG, '2', '--work-dir', work, '--cfg-options',
                       *data_root_options(data_root)], env=env)
    assert 'Iter(train) [3/3]' in log

    state = {(rank, stage): torch.load(osp.join(work, f'rank{rank}_{stage}.pth'), weights_only=True)
             for rank in (0, 1) for stage in ('before', 'after')}
    params = [k for k in state[0, 'after'] if not k.endswith(BN_BUFFERS)]
    running_stats = [k for k in state[0, 'after'] if k.endswith('running_mean')]
    assert params and running_stats
    for key in params:
        assert torch.equal(state[0, 'before'][key], state[1, 'before'][key]), key  # same start
        assert torch.equal(state[0, 'after'][key], state[1, 'after'][key]), key  # same end
    moved = [k for k in params if not torch.equal(state[0, 'before'][k], state[0, 'after'][k])]
    assert len(moved) > 0.9 * len(params), 'the weights barely changed; the check would be vacuous'
    # Different data per rank: the per-process BN statistics disagree.
    assert any(not torch.equal(state[0, 'after'][k], state[1, 'after'][k]) for k in running_stats)


def test_destroy_process_group_ends_the_group(tmp_path):
    assert not torch.distributed.is_initialized()
    destroy_process_group()  # nothing to do
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    destroy_process_group()
    assert not torch.distributed.is_initialized()


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
