# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Top-k ImageNet labels for images with a ViL classifier config and checkpoint, via MMPretrain's inferencer.

    python tools/classify.py configs/classification/vil-t16_192px-pre_8xb128-20e_in1k-224px.py \
        vil2_tiny16_e800_in1k.th demo.jpg [more.jpg ...] --topk 5

The checkpoint may be a released ``.th`` file, a VisionLSTM2 state dict or an MMPretrain checkpoint (training run
or tools/model_converters/vil2mmpretrain.py output); it is loaded strictly, with the position embedding resampled
to the config's resolution. Class names come from the checkpoint's ``dataset_meta`` (training runs record it),
else from the config's test dataset (ImageNet-1K names). Prints one JSON line per image.
"""
import argparse
import json

from mmseg_vil.apis.classification import build_inferencer, top_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='classification config (configs/classification/*.py)')
    parser.add_argument('checkpoint', help='classifier checkpoint')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--topk', type=int, default=5, help='number of labels per image')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cuda:0')
    args = parser.parse_args()

    inferencer = build_inferencer(args.config, args.checkpoint, args.device)
    for image, predictions in zip(args.images, top_k(inferencer, args.images, args.topk)):
        print(json.dumps({'image': image, 'topk': predictions}))


if __name__ == '__main__':
    main()
