# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Training and evaluation runs from a config: the logic behind ``tools/train.py`` and ``tools/test.py``.

Kept in the package (not in the scripts) so that other tools, notebooks and tests drive exactly the same code:
:func:`load_config` resolves a config with command-line style overrides, :func:`run_train` and :func:`run_test` apply
the run options (resume, AMP, TTA, visualisation, prediction output) and hand the config to an MMEngine ``Runner``.
Importing this module imports :mod:`mmseg_vil`, whose compatibility fixes must precede the first ``mmseg.models``
import that building a Runner triggers.
"""
import json
import os.path as osp
from typing import Optional

from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .compile import compile_parts, take_compile_options
from .distributed import setup_cpu_distributed


def load_config(config: str,
                work_dir: Optional[str] = None,
                cfg_options: Optional[dict] = None,
                launcher: str = 'none') -> Config:
    """Read ``config``, merge ``cfg_options`` and set the launcher and the work dir.

    The work dir is taken from ``work_dir``, else from the config, else ``./work_dirs/<config name>``.
    """
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    """A Runner for ``cfg`` (a custom ``runner_type`` if the config names one), after CPU-distributed setup; a
    ``compile`` option compiles the network parts (see :mod:`.compile`)."""
    setup_cpu_distributed(cfg)
    compile_options = take_compile_options(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    if compile_options is not None:
        compile_parts(runner.model, compile_options)
    return runner


def run_train(cfg: Config, resume: Optional[str] = None, amp: bool = False) -> Runner:
    """Train with ``cfg`` and return the finished Runner.

    Args:
        cfg: a config from :func:`load_config`; modified in place.
        resume: ``None`` (start fresh), ``'auto'`` (the latest checkpoint of the work dir, if any) or a checkpoint
            path; resuming restores weights, optimizer, schedulers and the iteration counter.
        amp: train with automatic mixed precision (fp16, dynamic loss scaling), as the official recipe does.
    """
    if amp:
        wrapper = cfg.optim_wrapper
        if wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print_log('The config already uses AmpOptimWrapper; --amp changes nothing', logger='current')
        else:
            wrapper.type = 'AmpOptimWrapper'
            wrapper.setdefault('loss_scale', 'dynamic')
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        cfg.resume, cfg.load_from = True, resume
    runner = build_runner(cfg)
    runner.train()
    return runner


def _to_json(value):
    """NumPy arrays and scalars as lists and numbers; anything else as text."""
    return value.tolist() if hasattr(value, 'tolist') else str(value)


def run_test(cfg: Config,
             checkpoint: str,
             out: Optional[str] = None,
             show_dir: Optional[str] = None,
             tta: bool = False) -> dict:
    """Evaluate ``checkpoint`` on the config's test set; print mIoU and write ``<work_dir>/test_metrics.json``.

    Args:
        cfg: a config from :func:`load_config`; modified in place.
        checkpoint: the weights to evaluate.
        out: directory for the predicted label maps (PNG, dataset label values).
        show_dir: directory for every image drawn with its ground truth and prediction.
        tta: multi-scale + flip test-time augmentation with the config's ``tta_pipeline`` and ``tta_model``.

    Returns:
        The metrics of the test evaluator (e.g. ``aAcc``, ``mIoU``, ``mAcc`` in percent).
    """
    cfg.load_from = checkpoint
    if show_dir is not None:
        if 'visualization' not in cfg.default_hooks:
            raise KeyError('--show-dir needs default_hooks.visualization (a SegVisualizationHook) in the config')
        cfg.default_hooks.visualization.update(draw=True, interval=1)  # every image, not every 50th
        cfg.visualizer.save_dir = show_dir
    if tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if out is not None:
        cfg.test_evaluator.output_dir = out
    metrics = build_runner(cfg).test()
    if is_main_process():
        report = dict(config=cfg.filename, checkpoint=checkpoint, tta=tta, metrics=metrics)
        path = osp.join(cfg.work_dir, 'test_metrics.json')
        with open(path, 'w') as f:
            json.dump(report, f, indent=2, default=_to_json)
        if 'mIoU' in metrics:
            print(f'mIoU: {metrics["mIoU"]:.2f}')
        print(f'Test metrics saved to {path}')
    return metrics
