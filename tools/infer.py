"""Segment an image, a folder (recursively) or a glob with a trained model; write masks and colour overlays.

    python tools/infer.py CONFIG CHECKPOINT data/ade_demo/ADEChallengeData2016/images/validation --out-dir out/

Writes ``OUT_DIR/pred/<name>.png`` (class index per pixel) and ``OUT_DIR/vis/<name>.png`` (overlay), where
``<name>`` is the input's path below the inputs' common folder with its extension (``a.jpg`` -> ``a.jpg.png``), so
that no two inputs share an output. Unreadable files are named with the reason and skipped; the exit status is
non-zero only if no image could be segmented. The options, inputs and files are checked before the model loads,
and a checkpoint that does not fit the config's model stops the run (unless --allow-partial-load).
"""
import argparse
import sys

from mmengine.config import DictAction

from mmseg_vil.apis import segment_images
from mmseg_vil.apis.batch_inputs import (check_file, check_fraction, check_inputs_outside_results, check_out_dir,
                                         check_positive, collect_images, resolve_device)
from mmseg_vil.utils.checkpoint import CheckpointMismatchError
from mmseg_vil.utils.config import read_model_config
from mmseg_vil.utils.cpu_allocator import keep_freed_memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('inputs', nargs='+', help='image files, folders or glob patterns (quote globs)')
    parser.add_argument('--out-dir', default='outputs/infer', help='output folder')
    parser.add_argument('--device', help='e.g. cpu, cuda:0 (default: cuda when available, else cpu)')
    parser.add_argument('--opacity', type=float, default=0.5, help='opacity of the class colours in overlays, 0-1')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass, at least 1')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='accept a checkpoint that fits the model only partly (the rest stays random)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. model.test_cfg.mode=whole')
    args = parser.parse_args()

    try:
        check_fraction('--opacity', args.opacity)
        check_positive('--batch-size', args.batch_size)
        device = resolve_device(args.device)
        read_model_config(args.config, 'segmentation')
        check_file('checkpoint', args.checkpoint)
        check_out_dir('--out-dir', args.out_dir)
        check_inputs_outside_results(collect_images(args.inputs), args.out_dir)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if device == 'cpu':
        keep_freed_memory()  # each forward pass re-uses the previous one's pages instead of faulting them in
    try:
        summary = segment_images(args.config, args.checkpoint, args.inputs, args.out_dir, device=device,
                                 opacity=args.opacity, batch_size=args.batch_size, cfg_options=args.cfg_options,
                                 allow_partial=args.allow_partial_load)
    except CheckpointMismatchError as error:
        sys.exit(f'{parser.prog}: error: {error}')
    print(summary.report())
    print(f'results in {args.out_dir}/pred (masks) and {args.out_dir}/vis (overlays)')
    return 0 if summary.outputs else 1


if __name__ == '__main__':
    sys.exit(main())
