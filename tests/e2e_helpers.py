"""Shared by the end-to-end tests: a generated ADE20K-layout folder and running the package's tools as scripts."""
import os
import os.path as osp
import socket
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from mmseg_vil.datasets.synthetic_ade20k import generate_ade20k

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_CONFIG = osp.join(ROOT, 'tests', 'configs', 'upernet_vil-tiny_synthetic-64x64.py')
DATA_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def save_initialized_checkpoint(path: str, config: str = TINY_CONFIG, seed: int = 0, **model_options) -> str:
    """Save the randomly initialised model of ``config`` (``model_options`` merged into ``model``) like a training
    run's checkpoint, with ADE20K's class names and palette as its ``dataset_meta``; return ``path``."""
    import torch
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmseg.datasets import ADE20KDataset
    from mmseg.registry import MODELS

    cfg = Config.fromfile(config)
    cfg.merge_from_dict({f'model.{key}': value for key, value in model_options.items()})
    MMLogger.get_instance('initialized_checkpoint', log_level='WARNING')  # no per-parameter init report
    init_default_scope('mmseg')
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    meta = dict(dataset_meta=dict(classes=ADE20KDataset.METAINFO['classes'], palette=ADE20KDataset.METAINFO['palette']))
    torch.save(dict(state_dict=model.state_dict(), meta=meta), path)
    return path


def make_ade20k(root: str, num_train: int = 4) -> str:
    """``num_train`` training and two validation 64x64 images with labels, in the ADEChallengeData2016 layout."""
    generate_ade20k(root, num_train=num_train, num_val=2, size=(64, 64))
    return root


def data_root_options(data_root: str) -> List[str]:
    """``--cfg-options`` entries pointing every dataloader at ``data_root``."""
    return [f'{loader}.dataset.data_root={data_root}' for loader in DATA_LOADERS]


def tool_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)  # checkpoints must load with torch.load's weights-only default
    return env


def run_command(command: List[str], timeout: int = 400, env: Optional[Dict[str, str]] = None) -> str:
    """Run ``command`` from the repository root; return stdout and stderr, failing with their tail."""
    return run_commands([(command, env or tool_env())], timeout)[0]


def run_commands(commands: Sequence[Tuple[List[str], Dict[str, str]]], timeout: int = 400) -> List[str]:
    """Run ``(command, env)`` pairs side by side from the repository root; return their outputs as run_command does.

    Side by side because the end-to-end runs spend much of their time starting Python and waiting on each other.
    """
    logs = [tempfile.TemporaryFile('w+') for _ in commands]
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
             for (command, env), log in zip(commands, logs)]
    outputs = []
    try:
        for proc, log in zip(procs, logs):
            proc.wait(timeout)
            log.seek(0)
            outputs.append(log.read())
    finally:
        for proc, log in zip(procs, logs):
            proc.terminate()  # only those still running (after a timeout); torchrun stops its workers
            log.close()
    for (command, _), proc, output in zip(commands, procs, outputs):
        assert proc.returncode == 0, f'{command} failed ({proc.returncode}):\n{output[-6000:]}'
    return outputs


def run_tool(args: List[str], timeout: int = 400) -> str:
    """Run a Python tool of the repository, ``python <args>``, like :func:`run_command`."""
    return run_command([sys.executable, *args], timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]
