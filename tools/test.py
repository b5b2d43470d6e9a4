# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out DIR] [--show-dir DIR]
[--tta] [--allow-partial-load] [--cfg-options ...]``; prints mIoU and writes
``<work_dir>/<timestamp>/test_metrics.json``.

A thin wrapper over :mod:`mmseg_vil.engine`.
"""
from mmseg_vil.engine.cli import test_main

if __name__ == '__main__':
    test_main()
