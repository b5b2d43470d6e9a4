"""Convert an official Vision-LSTM checkpoint (released ``.th`` or VisionLSTM2 state dict) to mmseg_vil's format.

    python tools/model_converters/vil2mmseg.py vil2_tiny16_e800_in1k.th pretrained/vil2_tiny_mmseg.pth

The output holds the backbone under ``state_dict`` (load with ``init_cfg=dict(type='Pretrained', checkpoint=DST)``);
``--keep-head`` also keeps the classifier as ``head.norm.*`` / ``head.fc.*``.
"""
import argparse

import torch

from mmseg_vil.models.backbones.vil_checkpoint import convert_vil_state_dict, detect_vil_format, split_backbone_and_head
from mmseg_vil.utils.checkpoint import CheckpointMismatchError, read_conversion_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official checkpoint (.th / .pth)')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--keep-head', action='store_true', help='keep the classifier head')
    args = parser.parse_args()

    try:
        source = read_conversion_source(args.src, args.dst)
        converted = convert_vil_state_dict(source)
    except (ValueError, CheckpointMismatchError) as error:
        parser.error(str(error))
    backbone, head = split_backbone_and_head(converted)
    state_dict = converted if args.keep_head else backbone
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': args.src,
                                                   'source_format': detect_vil_format(source)}}, args.dst)
    print(f'{args.src} ({detect_vil_format(source)}, {len(source)} tensors) -> {args.dst} '
          f'({len(state_dict)} tensors{", head kept" if args.keep_head else f", {len(head)} head tensors dropped"})')


if __name__ == '__main__':
    main()
