"""Segment images with a model exported by export_onnx.py, in ONNX Runtime only (PyTorch is not imported).

    python tools/deploy/infer_onnx.py model.onnx data/ade_demo/ADEChallengeData2016/images/validation --out-dir out/

Writes what tools/infer.py writes for the same model: ``OUT_DIR/pred/<name>.png`` (class index per pixel) and
``OUT_DIR/vis/<name>.png`` (overlay), ``<name>`` being the input's path below the inputs' common folder with its
extension. Unreadable files are named with the reason and skipped; the exit status is non-zero only if no image
could be segmented.
"""
import argparse
import os.path as osp
import sys

from mmseg_vil_runtime import check_inputs_outside_results, collect_images
from mmseg_vil_runtime.predictor import OnnxSegmentor, segment_files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='.onnx file written by tools/deploy/export_onnx.py')
    parser.add_argument('inputs', nargs='+', help='image files, folders or glob patterns (quote globs)')
    parser.add_argument('--out-dir', default='outputs/infer_onnx', help='output folder')
    parser.add_argument('--opacity', type=float, default=0.5, help='opacity of the class colours in overlays')
    parser.add_argument('--threads', type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument('--providers', nargs='+', default=['CPUExecutionProvider'],
                        help='ONNX Runtime execution providers, e.g. CUDAExecutionProvider CPUExecutionProvider')
    args = parser.parse_args()
    if not 0.0 <= args.opacity <= 1.0:
        parser.error(f'--opacity must be in [0, 1], got {args.opacity}')
    if osp.exists(args.out_dir) and not osp.isdir(args.out_dir):
        parser.error(f'--out-dir {args.out_dir} is a file, not a folder')
    try:
        paths = collect_images(args.inputs)
        check_inputs_outside_results(paths, args.out_dir)
        segmentor = OnnxSegmentor(args.model, providers=args.providers, threads=args.threads)
    except (FileNotFoundError, ValueError) as error:  # inputs naming nothing or among the results; no exported model
        parser.error(str(error))
    summary = segment_files(segmentor.segment, paths, args.out_dir, segmentor.palette, opacity=args.opacity)
    print(summary.report())
    print(f'results in {args.out_dir}/pred (masks) and {args.out_dir}/vis (overlays)')
    return 0 if summary.outputs else 1


if __name__ == '__main__':
    sys.exit(main())
