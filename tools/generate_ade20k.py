"""Write a synthetic ADE20K (ADEChallengeData2016 layout, learnable content) for demos and smoke tests.

    python tools/generate_ade20k.py data/ade_demo/ADEChallengeData2016 --num-train 400 --num-val 50 --size 128 128

See :mod:`mmseg_vil.datasets.synthetic_ade20k` for what the images contain.
"""
import argparse

from mmseg_vil.datasets import generate_ade20k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', help='output folder (the ADEChallengeData2016 directory)')
    parser.add_argument('--num-train', type=int, default=400, help='training images')
    parser.add_argument('--num-val', type=int, default=50, help='validation images')
    parser.add_argument('--size', type=int, nargs=2, default=(128, 128), metavar=('H', 'W'), help='image size')
    parser.add_argument('--num-classes', type=int, default=8, help='ADE classes used (1..N), at most 150')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    args = parser.parse_args()
    counts = generate_ade20k(args.root, num_train=args.num_train, num_val=args.num_val, size=tuple(args.size),
                             num_classes=args.num_classes, seed=args.seed)
    print(f'wrote {counts["training"]} training and {counts["validation"]} validation images to {args.root}')


if __name__ == '__main__':
    main()
