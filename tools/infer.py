"""Segment an image, a folder (recursively) or a glob with a trained model; write masks and colour overlays.

    python tools/infer.py CONFIG CHECKPOINT data/ade_demo/ADEChallengeData2016/images/validation --out-dir out/

Writes ``OUT_DIR/pred/<name>.png`` (class index per pixel) and ``OUT_DIR/vis/<name>.png`` (overlay). Unreadable
files are reported and skipped; the exit status is non-zero only if no image could be segmented.
"""
import argparse
import sys

from mmseg_vil.apis import segment_images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('inputs', nargs='+', help='image files, folders or glob patterns (quote globs)')
    parser.add_argument('--out-dir', default='outputs/infer', help='output folder')
    parser.add_argument('--device', default='cpu', help='e.g. cpu, cuda:0')
    parser.add_argument('--opacity', type=float, default=0.5, help='opacity of the class colours in overlays')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass')
    args = parser.parse_args()
    try:
        summary = segment_images(args.config, args.checkpoint, args.inputs, args.out_dir, device=args.device,
                                 opacity=args.opacity, batch_size=args.batch_size)
    except FileNotFoundError as error:  # an input that names nothing is a usage error, not a bad image
        parser.error(str(error))
    print(summary.report())
    print(f'results in {args.out_dir}/pred (masks) and {args.out_dir}/vis (overlays)')
    return 0 if summary.outputs else 1


if __name__ == '__main__':
    sys.exit(main())
