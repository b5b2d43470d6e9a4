# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Convert an official Vision-LSTM classifier (released ``.th`` or VisionLSTM2 state dict) to an MMPretrain checkpoint.

    python tools/model_converters/vil2mmpretrain.py vil2_tiny16_e800_in1k.th pretrained/vil2_tiny_mmpretrain.pth

The output holds ``backbone.*`` and ``head.*`` under ``state_dict``, the layout of MMPretrain ``ImageClassifier``
checkpoints: use it as ``load_from`` / ``--checkpoint`` of the configs in configs/classification/, or start a
segmentation backbone from it with ``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``.
"""
import argparse

import torch

from mmseg_vil.models.backbones.vil_checkpoint import detect_vil_format
from mmseg_vil.models.classifier_checkpoint import vil_classifier_state_dict
from mmseg_vil.utils.checkpoint import CheckpointMismatchError, read_conversion_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official checkpoint (.th / .pth)')
    parser.add_argument('dst', help='output path')
    args = parser.parse_args()

    try:
        source = read_conversion_source(args.src, args.dst)
        state_dict = vil_classifier_state_dict(source)
    except (ValueError, CheckpointMismatchError) as error:
        parser.error(str(error))
    source_format = detect_vil_format(source)
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': args.src, 'source_format': source_format}},
               args.dst)
    print(f'{args.src} ({source_format}, {len(source)} tensors) -> {args.dst} ({len(state_dict)} tensors)')


if __name__ == '__main__':
    main()
