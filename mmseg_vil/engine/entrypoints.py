# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Training and evaluation runs from a config: the logic behind ``tools/train.py`` and ``tools/test.py``.

Kept in the package (not in the scripts) so that other tools, notebooks and tests drive exactly the same code:
:func:`load_config` resolves a config with command-line style overrides, :func:`run_train` and :func:`run_test` apply
the run options (resume, AMP, TTA, visualisation, prediction output), refuse what would go wrong silently (a run
over another run's checkpoints, a checkpoint that does not fit, AMP without a device) and hand the config to an
MMEngine ``Runner``.
Importing this module imports :mod:`mmseg_vil`, whose compatibility fixes must precede the first ``mmseg.models``
import that building a Runner triggers.
"""
import json
import os.path as osp
from typing import Optional

from mmengine.config import Config
from mmengine.device import get_device
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..utils.checkpoint import read_checkpoint
from ..utils.config import ConfigError, read_model_config
from .compile import compile_parts, take_compile_options
from .distributed import setup_cpu_distributed
from .work_dir import RunRefused, plan_start


def load_config(config: str,
                work_dir: Optional[str] = None,
                cfg_options: Optional[dict] = None,
                launcher: str = 'none') -> Config:
    """Read ``config``, merge ``cfg_options`` and set the launcher and the work dir.

    The work dir is taken from ``work_dir``, else from the config, else ``./work_dirs/<config name>``. A file that is
    no model config, or a work dir that is a file, raises :class:`~mmseg_vil.utils.config.ConfigError`.
    """
    cfg = read_model_config(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    if osp.isfile(cfg.work_dir):
        raise ConfigError(f'work dir {cfg.work_dir} is a file, not a folder: name another --work-dir')
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


def apply_checkpoint_policy(cfg: Config, source: str, allow_partial: bool = False) -> None:
    """Make the Runner load ``load_from`` / ``resume`` checkpoints under the package's policy
    (:class:`~mmseg_vil.engine.checkpoint_policy.CheckpointPolicyHook`).

    A partial load is allowed by ``allow_partial`` or by ``allow_partial_load = True`` in the config.
    """
    hooks = [h for h in cfg.get('custom_hooks', None) or [] if h.get('type') != 'CheckpointPolicyHook']
    allow_partial = allow_partial or bool(cfg.get('allow_partial_load', False))
    cfg.custom_hooks = hooks + [dict(type='CheckpointPolicyHook', allow_partial=allow_partial, source=source)]


def check_checkpoint_readable(path: str) -> None:
    """Read a local checkpoint before the Runner does: MMEngine would answer a file that is no checkpoint with an
    unpickler traceback, after building the model (a URL is left to MMEngine)."""
    if '://' not in path:
        read_checkpoint(path)


def check_amp_device(cfg: Config) -> None:
    """MMEngine's ``AmpOptimWrapper`` asserts an accelerator; say so before anything is built."""
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper' and get_device() in ('cpu', 'mps'):
        raise RunRefused('mixed precision (--amp, or optim_wrapper.type=AmpOptimWrapper in the config) needs a CUDA, '
                         'NPU, MLU or MUSA device, and none is available: on CPU train without --amp, or set '
                         'optim_wrapper.type=OptimWrapper (dropping its dtype and loss_scale) to train in float32')


def run_train(cfg: Config,
              resume: Optional[str] = None,
              amp: bool = False,
              load_from: Optional[str] = None,
              allow_partial: bool = False) -> Runner:
    """Train with ``cfg`` and return the finished Runner.

    Args:
        cfg: a config from :func:`load_config`; modified in place.
        resume: ``None`` (start fresh), ``'auto'`` (the latest checkpoint of the work dir) or a checkpoint path;
            resuming restores weights, optimizer, schedulers and the iteration counter.
        amp: train with automatic mixed precision (fp16, dynamic loss scaling), as the official recipe does.
        load_from: initial weights of a new run (overrides the config's ``load_from``).
        allow_partial: let ``load_from`` fit the model partly (see :func:`apply_checkpoint_policy`).

    Raises:
        RunRefused: before anything is built, if the run would overwrite another run's checkpoints, ``resume``
            has nothing to resume, or AMP has no device.
    """
    if amp:
        wrapper = cfg.optim_wrapper
        if wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print_log('The config already uses AmpOptimWrapper; --amp changes nothing', logger='current')
        else:
            wrapper.type = 'AmpOptimWrapper'
            wrapper.setdefault('loss_scale', 'dynamic')
    check_amp_device(cfg)
    if load_from is not None:
        cfg.load_from = load_from
    if resume is None and cfg.get('resume'):  # resume = True in the config: as --resume [load_from]
        resume = cfg.get('load_from') or 'auto'
    resume_from = plan_start(cfg.work_dir, resume, cfg.get('load_from'))
    if resume_from is not None:
        cfg.resume, cfg.load_from = True, resume_from
    else:
        cfg.resume = False
    if cfg.get('load_from'):
        check_checkpoint_readable(cfg.load_from)
        apply_checkpoint_policy(cfg, cfg.load_from, allow_partial)
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
             tta: bool = False,
             allow_partial: bool = False) -> dict:
    """Evaluate ``checkpoint`` on the config's test set; print mIoU and write ``test_metrics.json`` into the run's
    timestamped log folder (``<work_dir>/<timestamp>/``, next to MMEngine's log), so no earlier result is replaced.

    Args:
        cfg: a config from :func:`load_config`; modified in place.
        checkpoint: the weights to evaluate; they must fit the model (see :func:`apply_checkpoint_policy`).
        out: directory for the predicted label maps (PNG, dataset label values).
        show_dir: directory for every image drawn with its ground truth and prediction.
        tta: multi-scale + flip test-time augmentation with the config's ``tta_pipeline`` and ``tta_model``.
        allow_partial: evaluate a checkpoint that fits the model only partly (an explicit, logged choice).

    Returns:
        The metrics of the test evaluator (e.g. ``aAcc``, ``mIoU``, ``mAcc`` in percent).
    """
    if '://' not in checkpoint and not osp.isfile(checkpoint):
        raise RunRefused(f'checkpoint {checkpoint}: no such file')
    check_checkpoint_readable(checkpoint)
    cfg.load_from, cfg.resume = checkpoint, False
    apply_checkpoint_policy(cfg, checkpoint, allow_partial)
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
    runner = build_runner(cfg)
    metrics = runner.test()
    if is_main_process():
        report = dict(config=cfg.filename, checkpoint=checkpoint, tta=tta, metrics=metrics)
        path = osp.join(runner.log_dir, 'test_metrics.json')
        with open(path, 'w') as f:
            json.dump(report, f, indent=2, default=_to_json)
        if 'mIoU' in metrics:
            print(f'mIoU: {metrics["mIoU"]:.2f}')
        print(f'Test metrics saved to {path}')
    return metrics
