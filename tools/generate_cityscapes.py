"""Write a synthetic Cityscapes (the layout mmseg's CityscapesDataset reads, learnable content) for smoke tests.

    python tools/generate_cityscapes.py data/cityscapes_synthetic --num-train 300 --num-val 50 --size 128 256

See :mod:`mmseg_vil.datasets.synthetic_cityscapes` for the layout and what the images contain.
"""
from mmseg_vil.datasets import generate_cityscapes
from mmseg_vil.datasets.generator_cli import run_generator_cli

if __name__ == '__main__':
    run_generator_cli(generate_cityscapes, __doc__, root_help='output folder (in place of data/cityscapes)',
                      classes_help='train ids used (0..N-1), at most 19')
