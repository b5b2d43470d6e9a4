"""Compare segmentors on the same validation set: params, GFLOPs, mIoU, aAcc, img/s as a markdown table.

    # evaluate checkpoints (on each config's test set)
    python tools/compare.py --eval configs/demo/vil_demo.py work_dirs/vil/iter_240.pth \\
                            --eval configs/demo/deit_demo.py work_dirs/deit/iter_240.pth
    # or read finished training runs (their dumped config and last validation)
    python tools/compare.py --work-dir work_dirs/vil --work-dir work_dirs/deit

Also writes OUT_DIR/comparison.json and OUT_DIR/comparison.png. Every checkpoint must fit its config (else the
tool stops before evaluating anything, naming the fix). FLOPs are counted at --shape (default 512x512)
with torch's FlopCounterMode, one multiply-add = 2 FLOPs (see mmseg_vil.apis.complexity).
"""
import argparse
import os
import os.path as osp
import sys

from mmseg_vil.apis.batch_inputs import check_out_dir, check_positive, resolve_device
from mmseg_vil.apis.compare import ModelSpec, compare, plot_comparison, render_markdown, write_json
from mmseg_vil.utils.checkpoint import CheckpointMismatchError
from mmseg_vil.utils.config import ConfigError


def _name(path: str) -> str:
    return osp.splitext(osp.basename(osp.normpath(path)))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--eval', nargs=2, action='append', default=[], metavar=('CONFIG', 'CHECKPOINT'),
                        help='evaluate CHECKPOINT with CONFIG (repeat for several models)')
    parser.add_argument('--work-dir', action='append', default=[], dest='work_dirs',
                        help='read a finished tools/train.py run (repeatable)')
    parser.add_argument('--names', nargs='+', help='model names, in the order of --eval then --work-dir '
                        '(default: config or work dir names)')
    parser.add_argument('--shape', type=int, nargs=2, default=(512, 512), metavar=('H', 'W'),
                        help='input size for the FLOPs')
    parser.add_argument('--device', help='device for evaluation and FLOP counting (default: cuda when available)')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='accept checkpoints that fit their config only partly (the rest stays random)')
    parser.add_argument('--out-dir', default='outputs/compare', help='folder for comparison.json / .png')
    args = parser.parse_args()

    specs = [ModelSpec(_name(cfg), config=cfg, checkpoint=ckpt) for cfg, ckpt in args.eval]
    specs += [ModelSpec(_name(work_dir), work_dir=work_dir) for work_dir in args.work_dirs]
    if not specs:
        parser.error('nothing to compare: give --eval CONFIG CHECKPOINT and/or --work-dir DIR')
    if args.names:
        if len(args.names) != len(specs):
            parser.error(f'--names has {len(args.names)} names for {len(specs)} models')
        for spec, name in zip(specs, args.names):
            spec.name = name
    try:
        device = resolve_device(args.device)
        for side in args.shape:
            check_positive('--shape', side)
        check_out_dir('--out-dir', args.out_dir)
    except ValueError as error:
        parser.error(str(error))
    try:
        rows = compare(specs, flops_shape=tuple(args.shape), device=device, allow_partial=args.allow_partial_load)
    except (CheckpointMismatchError, ConfigError, FileNotFoundError) as error:
        sys.exit(f'{parser.prog}: error: {error}')
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(rows, osp.join(args.out_dir, 'comparison.json'))
    plot_comparison(rows, osp.join(args.out_dir, 'comparison.png'))
    print(render_markdown(rows))
    print(f'\nwritten: {args.out_dir}/comparison.json, {args.out_dir}/comparison.png')


if __name__ == '__main__':
    main()
