# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Command-line interfaces of ``tools/train.py`` and ``tools/test.py`` (argument parsing only).

The options follow MMSegmentation's tools, so its documentation and launch scripts apply unchanged; ``--resume``
additionally accepts a checkpoint path, as in MMPretrain. A refused run (see :mod:`.work_dir`) or a checkpoint that
does not fit the model ends the tool with its message and exit status 1, without a traceback.
"""
import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

from mmengine.config import DictAction

from ..utils.checkpoint import CheckpointMismatchError
from ..utils.config import ConfigError
from .distributed import destroy_process_group
from .entrypoints import load_config, run_test, run_train
from .work_dir import RunRefused

LAUNCHERS = ['none', 'pytorch', 'slurm', 'mpi']


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='directory for logs, checkpoints and metrics')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='accept a checkpoint that fits the model only partly: load the matching tensors, keep '
                        'the others at their initial values and log them (default: refuse such a checkpoint)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.init_cfg.checkpoint=PATH '
                        'train_dataloader.batch_size=2 (lists: key=[a,b], nested keys with dots)')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK itself.
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)


def _export_local_rank(args: argparse.Namespace) -> None:
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))


def _load_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The run's config; a file that is no model config ends the tool with its path and the fix (not a traceback)."""
    try:
        return load_config(args.config, args.work_dir, args.cfg_options, args.launcher)
    except ConfigError as error:
        parser.error(str(error))


@contextmanager
def _tool_run(prog: str) -> Iterator[None]:
    """Report refusals as ``prog: error: ...`` (exit status 1) and end a distributed run cleanly."""
    try:
        yield
    except (RunRefused, CheckpointMismatchError) as error:
        sys.exit(f'{prog}: error: {error}')
    finally:
        destroy_process_group()


def train_main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Train a segmentor (or classifier) from an OpenMMLab config')
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or without a value from the latest checkpoint in the work dir')
    parser.add_argument('--load-from', metavar='CHECKPOINT',
                        help='start a new run from the weights of CHECKPOINT (a whole model of this config)')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (fp16; needs a GPU)')
    _add_common_args(parser)
    args = parser.parse_args(argv)
    _export_local_rank(args)
    cfg = _load_config(parser, args)
    with _tool_run(parser.prog):
        run_train(cfg, resume=args.resume, amp=args.amp, load_from=args.load_from,
                  allow_partial=args.allow_partial_load)


def test_main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Evaluate a checkpoint; prints mIoU, writes test_metrics.json')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='directory to save the predicted label maps')
    parser.add_argument('--show-dir', help='directory to save drawn predictions')
    parser.add_argument('--tta', action='store_true', help='multi-scale and flip test-time augmentation')
    _add_common_args(parser)
    args = parser.parse_args(argv)
    _export_local_rank(args)
    cfg = _load_config(parser, args)
    with _tool_run(parser.prog):
        run_test(cfg, args.checkpoint, out=args.out, show_dir=args.show_dir, tta=args.tta,
                 allow_partial=args.allow_partial_load)
