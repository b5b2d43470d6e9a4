# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Command-line interfaces of ``tools/train.py`` and ``tools/test.py`` (argument parsing only).

The options follow MMSegmentation's tools, so its documentation and launch scripts apply unchanged; ``--resume``
additionally accepts a checkpoint path, as in MMPretrain.
"""
import argparse
import os
from typing import List, Optional

from mmengine.config import DictAction

from .entrypoints import load_config, run_test, run_train

LAUNCHERS = ['none', 'pytorch', 'slurm', 'mpi']


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='directory for logs, checkpoints and metrics')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.init_cfg.checkpoint=PATH '
                        'train_dataloader.batch_size=2 (lists: key=[a,b], nested keys with dots)')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK itself.
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)


def _export_local_rank(args: argparse.Namespace) -> None:
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))


def train_main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Train a segmentor (or classifier) from an OpenMMLab config')
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or without a value from the latest checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (fp16)')
    _add_common_args(parser)
    args = parser.parse_args(argv)
    _export_local_rank(args)
    cfg = load_config(args.config, args.work_dir, args.cfg_options, args.launcher)
    run_train(cfg, resume=args.resume, amp=args.amp)


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
    cfg = load_config(args.config, args.work_dir, args.cfg_options, args.launcher)
    run_test(cfg, args.checkpoint, out=args.out, show_dir=args.show_dir, tta=args.tta)
