"""Write a synthetic ADE20K (ADEChallengeData2016 layout, learnable content) for demos and smoke tests.

    python tools/generate_ade20k.py data/ade_demo/ADEChallengeData2016 --num-train 400 --num-val 50 --size 128 128

See :mod:`mmseg_vil.datasets.synthetic_ade20k` for what the images contain.
"""
from mmseg_vil.datasets import generate_ade20k
from mmseg_vil.datasets.generator_cli import run_generator_cli

if __name__ == '__main__':
    run_generator_cli(generate_ade20k, __doc__, root_help='output folder (the ADEChallengeData2016 directory)',
                      classes_help='ADE classes used (1..N), at most 150')
