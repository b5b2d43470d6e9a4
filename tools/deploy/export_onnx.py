"""Export a trained segmentor (ViL, DeiT or Vim UperNet) to ONNX, verified against PyTorch before it is written.

    python tools/deploy/export_onnx.py CONFIG CHECKPOINT model.onnx [--shape H W] [--dynamic]

The graph maps normalised images to logits at the input size; resize, normalisation, sliding windows, class names
and palette travel in its metadata, so tools/deploy/infer_onnx.py needs neither the config nor PyTorch. ViL is
traced with a pure-PyTorch mLSTM form (--mlstm-backend auto: 'parallel' for inputs up to 256 patches, else
'chunkwise', as the 'auto' backend runs on the CPU). The export is refused, and nothing written, if ONNX Runtime's
logits differ from PyTorch's by more than --tolerance on any verification input, or if the model uses something the
export cannot reproduce.
"""
import argparse
import sys

from mmengine.config import DictAction

from mmseg_vil.deploy import DEFAULT_TOLERANCE, ExportRefused, export_segmentor
from mmseg_vil.utils.checkpoint import CheckpointMismatchError
from mmseg_vil.utils.config import ConfigError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='checkpoint file (with dataset_meta, as tools/train.py saves it)')
    parser.add_argument('out', help='output .onnx file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='model input size (default: the slide window, else the training crop)')
    parser.add_argument('--dynamic', action='store_true', help='dynamic height and width (not for Vim)')
    parser.add_argument('--mlstm-backend', default='auto', help='ViL mLSTM form: auto, parallel or chunkwise')
    parser.add_argument('--opset', type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help='largest accepted max |ONNX Runtime - PyTorch| of the logits')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    args = parser.parse_args()
    try:
        report = export_segmentor(args.config, args.checkpoint, args.out, size=args.shape, dynamic=args.dynamic,
                                  mlstm_backend=args.mlstm_backend, opset=args.opset, tolerance=args.tolerance,
                                  cfg_options=args.cfg_options)
    except (ExportRefused, ConfigError, CheckpointMismatchError) as error:  # nothing was written
        print(f'export refused: {error}', file=sys.stderr)
        return 1
    meta = report.metadata
    size = 'dynamic height and width' if meta.input_size is None else 'input {}x{}'.format(*meta.input_size)
    print(f'wrote {report.path}: {meta.backbone}, {size}, opset {meta.opset}, {len(meta.classes)} classes, '
          f'{report.seconds:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
