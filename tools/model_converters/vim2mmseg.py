"""Convert an official Vision Mamba checkpoint (hustvl/Vim, weights under ``model``) to mmseg_vil's format.

    python tools/model_converters/vim2mmseg.py vim_t_midclstok_76p1acc.pth pretrained/vim_tiny_mmseg.pth

The output holds the backbone under ``state_dict`` (load with ``init_cfg=dict(type='Pretrained', checkpoint=DST)``);
the classifier head is dropped. Official checkpoints also load directly; converting once saves the renaming.
"""
import argparse
from typing import Optional, Sequence

import torch

from mmseg_vil.models.backbones.vim import convert_official_vim, is_official_vim
from mmseg_vil.utils.checkpoint import CheckpointMismatchError, read_conversion_source


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--cls-position', choices=['middle', 'head'], default='middle',
                        help='where the model has its class token (official use_middle_cls_token); the weights do '
                             'not tell. Two class tokens (use_double_cls_token) are recognised by their names')
    args = parser.parse_args(argv)

    try:
        source = read_conversion_source(args.src, args.dst)
    except (ValueError, CheckpointMismatchError) as error:
        parser.error(str(error))
    if not is_official_vim(source):
        parser.error(f'{args.src} has no official Vim keys (layers.*.mixer.A_log); is it converted already?')
    state_dict = convert_official_vim(source, args.cls_position)
    torch.save({'state_dict': state_dict, 'meta': {'converted_from': args.src}}, args.dst)
    print(f'{args.src} ({len(source)} tensors) -> {args.dst} ({len(state_dict)} tensors, head dropped)')


if __name__ == '__main__':
    main()
