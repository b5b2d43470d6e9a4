# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Top-k ImageNet labels for images with a ViL classifier config and checkpoint, via MMPretrain's inferencer.

    python tools/classify.py configs/classification/vil-t16_192px-pre_8xb128-20e_in1k-224px.py \
        vil2_tiny16_e800_in1k.th demo.jpg [more.jpg | folder | 'glob/*.jpg' ...] --topk 5

The checkpoint may be a released ``.th`` file, a VisionLSTM2 state dict or an MMPretrain checkpoint (training run
or tools/model_converters/vil2mmpretrain.py output); it must fit the config's model (the position embedding is
resampled to the config's resolution), else the tool stops before classifying. Class names come from the
checkpoint's ``dataset_meta`` (training runs record it), else from the config's test dataset (ImageNet-1K names).
Prints one JSON line per image, sorted by path: ``{"image", "topk"}``, or ``{"image", "error"}`` for a file that
cannot be read, which is skipped. The exit status is non-zero only if no image could be classified.
"""
import argparse
import json
import sys

from mmseg_vil.apis.batch_inputs import check_file, check_positive, collect_images, resolve_device
from mmseg_vil.apis.classification import build_inferencer, classify_files
from mmseg_vil.utils.checkpoint import CheckpointMismatchError
from mmseg_vil.utils.config import read_model_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='classification config (configs/classification/*.py)')
    parser.add_argument('checkpoint', help='classifier checkpoint')
    parser.add_argument('images', nargs='+', help='image files, folders or glob patterns (quote globs)')
    parser.add_argument('--topk', type=int, default=5, help='number of labels per image, at least 1')
    parser.add_argument('--device', help='torch device, e.g. cuda:0 (default: cuda when available, else cpu)')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='accept a checkpoint that fits the model only partly (the rest stays random)')
    args = parser.parse_args()
    try:
        check_positive('--topk', args.topk)
        read_model_config(args.config, 'classification')
        check_file('checkpoint', args.checkpoint)
        device = resolve_device(args.device)
        paths = collect_images(args.images)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))

    try:
        inferencer = build_inferencer(args.config, args.checkpoint, device, allow_partial=args.allow_partial_load)
    except CheckpointMismatchError as error:
        sys.exit(f'{parser.prog}: error: {error}')
    summary = classify_files(inferencer, paths, args.topk)
    for path in paths:
        if path in summary.predictions:
            print(json.dumps({'image': path, 'topk': summary.predictions[path]}))
        else:
            print(json.dumps({'image': path, 'error': summary.failures[path]}))
    print(f'{len(paths)} images: {len(summary.predictions)} classified, {len(summary.failures)} failed',
          file=sys.stderr)
    return 0 if summary.predictions else 1


if __name__ == '__main__':
    sys.exit(main())
