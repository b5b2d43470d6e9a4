# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Run ``tools/dist_test.sh`` many times in a row with several CPU processes (gloo) and report every run that does
not end cleanly: a non-zero exit status, an abort at exit ("terminate called ..."), or no metrics printed.

    python tools/check_dist_test.py --runs 20 --procs 2 [--work-dir work_dirs/check_dist_test] \
        [--cfg-options test_dataloader.num_workers=2 ...]

A tiny ViL UperNet (tests/configs/upernet_vil-tiny_synthetic-64x64.py, randomly initialised and saved once) is
evaluated on a generated ADE20K-layout folder, so one run costs seconds and the check isolates process start-up
and shutdown. The exit status is the number of failed runs (0: all clean). Too slow for CI at 20 runs;
tests/test_distributed.py runs it once.
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
from typing import List, Optional, Sequence

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tests'))
from e2e_helpers import TINY_CONFIG as CONFIG  # noqa: E402  (the tests' tiny model and helpers)
from e2e_helpers import free_port, save_initialized_checkpoint  # noqa: E402

ABORT_MARKERS = ('terminate called', 'Aborted', 'SIGABRT', 'core dumped')


def prepare(work_dir: str) -> str:
    """Generate the data and a checkpoint of the tiny model in ``work_dir`` (once); return the checkpoint."""
    from mmseg_vil.datasets import generate_ade20k

    checkpoint = osp.join(work_dir, 'tiny.pth')
    data_root = osp.join(work_dir, 'ADEChallengeData2016')
    if not osp.isdir(data_root):
        generate_ade20k(data_root, num_train=2, num_val=4, size=(64, 64))
    return checkpoint if osp.isfile(checkpoint) else save_initialized_checkpoint(checkpoint, CONFIG)


def run_once(script: str, checkpoint: str, work_dir: str, procs: int, index: int,
             cfg_options: Sequence[str] = ()) -> Optional[str]:
    """One dist_test.sh run; ``None`` if it ended cleanly, else what went wrong (with the output's tail)."""
    data_root = osp.join(work_dir, 'ADEChallengeData2016')
    options = [f'{loader}.dataset.data_root={data_root}' for loader in ('val_dataloader', 'test_dataloader')]
    env = dict(os.environ, PORT=str(free_port()), OMP_NUM_THREADS='1', PYTHON=os.environ.get('PYTHON', sys.executable))
    command = ['bash', script, CONFIG, checkpoint, str(procs), '--work-dir', osp.join(work_dir, f'run{index}'),
               '--cfg-options', 'env_cfg.dist_cfg.backend=gloo', *options, *cfg_options]
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    problems: List[str] = []
    if proc.returncode != 0:
        problems.append(f'exit status {proc.returncode}')
    problems += [f'"{marker}" in the output' for marker in ABORT_MARKERS if marker in proc.stdout]
    if 'mIoU: ' not in proc.stdout:
        problems.append('no mIoU printed')
    return '; '.join(problems) + '\n' + proc.stdout[-3000:] if problems else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=int, default=20, help='consecutive runs')
    parser.add_argument('--procs', type=int, default=2, help='processes per run')
    parser.add_argument('--work-dir', default='work_dirs/check_dist_test', help='data, checkpoint and run logs')
    parser.add_argument('--script', default=osp.join(ROOT, 'tools', 'dist_test.sh'), help='launcher to check')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='more config overrides for tools/test.py, e.g. test_dataloader.num_workers=2')
    args = parser.parse_args()
    if args.runs < 1 or args.procs < 1:
        parser.error('--runs and --procs must be at least 1')
    work_dir = osp.abspath(args.work_dir)
    checkpoint = prepare(work_dir)
    failures = 0
    for index in range(args.runs):
        problem = run_once(args.script, checkpoint, work_dir, args.procs, index, args.cfg_options)
        print(f'run {index + 1}/{args.runs}: ' + ('clean' if problem is None else f'FAILED: {problem}'), flush=True)
        failures += problem is not None
    print(f'{args.runs - failures} of {args.runs} runs of {args.procs} processes ended cleanly')
    return failures


if __name__ == '__main__':
    sys.exit(main())
