# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Train from a config: ``python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT] | --load-from CKPT] [--amp]
[--allow-partial-load] [--cfg-options ...]``. A run never overwrites another run's checkpoints (see README).

A thin wrapper; the logic lives in :mod:`mmseg_vil.engine` (importing it registers the package's models).
"""
from mmseg_vil.engine.cli import train_main

if __name__ == '__main__':
    train_main()
