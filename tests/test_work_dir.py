"""tools/train.py never overwrites another run's checkpoints, and --resume without anything to resume says so.

The refusals come before anything is built, so these tests need neither data nor a model: the work dirs hold
stand-in checkpoint files whose bytes must be unchanged afterwards.
"""
import os.path as osp

import pytest
import torch
from e2e_helpers import TINY_CONFIG

from mmseg_vil.engine.cli import train_main
from mmseg_vil.engine.work_dir import RunRefused, plan_start


@pytest.fixture
def earlier_run(tmp_path):
    """A work dir with two checkpoints and the last_checkpoint record MMEngine writes."""
    work_dir = tmp_path / 'run'
    work_dir.mkdir()
    for name in ('iter_2.pth', 'iter_4.pth'):
        (work_dir / name).write_bytes(name.encode())
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_4.pth'))
    return work_dir


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _train(*argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_main([TINY_CONFIG, *map(str, argv)])
    return exit_info.value.code  # sys.exit(message): exit status 1


def test_new_run_into_an_earlier_run_is_refused(earlier_run):
    before = _snapshot(earlier_run)
    message = _train('--work-dir', earlier_run)
    assert ': error: ' in message and 'holds the checkpoints of an earlier run (iter_2.pth, iter_4.pth, ' \
        'last_checkpoint), which a new run would overwrite' in message
    assert 'continue that run with --resume, or start the new one in a fresh --work-dir' in message
    assert _snapshot(earlier_run) == before


def test_resume_with_nothing_to_resume_stops(tmp_path):
    message = _train('--work-dir', tmp_path / 'empty', '--resume')
    assert f'--resume: nothing to resume in {tmp_path / "empty"}' in message
    assert 'start a new run without --resume' in message


def test_resume_of_another_run_into_an_occupied_work_dir_is_refused(earlier_run, tmp_path):
    other = tmp_path / 'other.pth'
    other.write_bytes(b'another run')
    before = _snapshot(earlier_run)
    with pytest.raises(RunRefused, match='holds the checkpoints of another run'):
        plan_start(str(earlier_run), str(other), None)
    assert _snapshot(earlier_run) == before


def test_resume_plans(earlier_run, tmp_path):
    assert plan_start(str(earlier_run), 'auto', None) == str(earlier_run / 'iter_4.pth')
    assert plan_start(str(earlier_run), str(earlier_run / 'iter_2.pth'), None) == str(earlier_run / 'iter_2.pth')
    assert plan_start(str(tmp_path / 'fresh'), str(earlier_run / 'iter_2.pth'), None) == str(
        earlier_run / 'iter_2.pth')  # resuming into a new work dir overwrites nothing
    assert plan_start(str(tmp_path / 'fresh'), None, None) is None
    (earlier_run / 'iter_4.pth').unlink()  # last_checkpoint names a file that is gone
    with pytest.raises(RunRefused, match='nothing to resume'):
        plan_start(str(earlier_run), 'auto', None)
    with pytest.raises(RunRefused, match='no such checkpoint file'):
        plan_start(str(tmp_path / 'fresh'), str(tmp_path / 'missing.pth'), None)
    with pytest.raises(RunRefused, match='load_from .*missing.pth: no such checkpoint file'):
        plan_start(str(tmp_path / 'fresh'), None, str(tmp_path / 'missing.pth'))


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks a machine without an accelerator')
def test_amp_without_a_gpu_is_refused_clearly(tmp_path):
    message = _train('--work-dir', tmp_path / 'amp', '--amp')
    assert 'mixed precision (--amp, or optim_wrapper.type=AmpOptimWrapper in the config) needs a CUDA' in message
    assert 'on CPU train without --amp' in message
    assert not osp.exists(tmp_path / 'amp')


@pytest.mark.parametrize('main', ['train', 'test'])
def test_missing_config_is_named(main, tmp_path, capsys):
    from mmseg_vil.engine.cli import test_main
    missing = tmp_path / 'no_such_config.py'
    argv = [str(missing)] + ([] if main == 'train' else [str(tmp_path / 'x.pth')])
    with pytest.raises(SystemExit) as exit_info:
        (train_main if main == 'train' else test_main)(argv)
    assert exit_info.value.code == 2  # argparse's usage error
    assert f'error: config {missing}: no such file' in capsys.readouterr().err


@pytest.mark.parametrize('mistake, message', [
    ('checkpoint as config', 'not a config file (.py, .json, .yaml, .yml); give the config first, then the checkpoint'),
    ('work dir is a file', 'is a file, not a folder: name another --work-dir'),
])
def test_config_and_work_dir_mistakes_are_named(mistake, message, tmp_path, capsys):
    """Both used to end in tracebacks (MMEngine's OSError; FileExistsError once the Runner was being built)."""
    checkpoint = tmp_path / 'model.pth'
    torch.save({}, checkpoint)
    argv = ([str(checkpoint), '--work-dir', str(tmp_path / 'run')] if mistake == 'checkpoint as config' else
            [TINY_CONFIG, '--work-dir', str(checkpoint)])
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
