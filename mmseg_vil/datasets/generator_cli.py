# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""The command line shared by the synthetic dataset generators (``tools/generate_ade20k.py``,
``tools/generate_cityscapes.py``): the same options, with each generator's own defaults."""
import argparse
import inspect
import os
import os.path as osp
from typing import Callable, Dict, Optional, Sequence

Generator = Callable[..., Dict[str, int]]


def run_generator_cli(generate: Generator,
                      description: str,
                      root_help: str,
                      classes_help: str,
                      argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: ``sys.argv``), call ``generate`` and print what it wrote; a ``root`` that holds
    anything is refused, so that no earlier data is overwritten.

    ``generate(root, num_train, num_val, size, num_classes, seed)`` returns images per split, training split first;
    its keyword defaults are the options' defaults.
    """
    defaults = {name: param.default for name, param in inspect.signature(generate).parameters.items()}
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', help=root_help)
    parser.add_argument('--num-train', type=int, default=defaults['num_train'], help='training images')
    parser.add_argument('--num-val', type=int, default=defaults['num_val'], help='validation images')
    parser.add_argument('--size', type=int, nargs=2, default=defaults['size'], metavar=('H', 'W'), help='image size')
    parser.add_argument('--num-classes', type=int, default=defaults['num_classes'], help=classes_help)
    parser.add_argument('--seed', type=int, default=defaults['seed'], help='random seed')
    args = parser.parse_args(argv)
    if osp.isfile(args.root) or (osp.isdir(args.root) and os.listdir(args.root)):
        parser.error(f'{args.root} exists and is not an empty folder: the generator would write over what is there '
                     '(a real dataset, perhaps); name a new folder, or delete this one first')
    try:
        counts = generate(args.root, num_train=args.num_train, num_val=args.num_val, size=tuple(args.size),
                          num_classes=args.num_classes, seed=args.seed)
    except ValueError as error:  # an option out of range, refused before anything is written
        parser.error(str(error))
    num_train, num_val = counts.values()
    print(f'wrote {num_train} training and {num_val} validation images to {args.root}')
