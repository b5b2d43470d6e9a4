"""Data-parallel training on CPU: tools/dist_train.sh starts 2 processes (torchrun, gloo).

Each rank saves its weights before and after training (tests/configs/rank_state_hook.py). The replicas must end
identical although every rank trained on its own shard of the data, which shows in the per-rank BatchNorm running
statistics (SyncBN, which needs GPUs, becomes per-process BN on CPU).
"""
import os
import os.path as osp
import sys

import pytest
import torch
from e2e_helpers import ROOT, data_root_options, free_port, make_ade20k, run_command, tool_env

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
