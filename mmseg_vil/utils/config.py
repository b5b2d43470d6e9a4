# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Reading the model config a tool was given, so that a wrong file stops the tool with one line naming it and the fix.

MMEngine's ``Config.fromfile`` answers a checkpoint passed as the config, a ``_base_`` fragment or a config of the
other task with a traceback from deep inside the tool (or, for a fragment, only once the model is built).
"""
import os.path as osp
from typing import Optional

from mmengine.config import Config

CONFIG_EXTENSIONS = ('.py', '.json', '.yaml', '.yml')
# The model key that marks each task's configs, and the tool that runs configs of that task.
TASKS = {
    'segmentation': ('decode_head', 'tools/infer.py, tools/test.py and tools/compare.py take segmentation configs'),
    'classification': ('head', 'tools/classify.py takes classification configs'),
}


class ConfigError(ValueError):
    """A config that cannot serve the tool: a file missing, not a config, unreadable or without a model of the tool's
    task, or a setting that cannot work (a work dir that is a file)."""


def _task_of(model: dict) -> Optional[str]:
    return next((task for task, (key, _) in TASKS.items() if key in model), None)


def read_model_config(path: str, task: Optional[str] = None) -> Config:
    """The config at ``path``, which must define a model (of ``task``, ``'segmentation'`` or ``'classification'``,
    when given); else :class:`ConfigError` naming the file and the fix."""
    if not osp.isfile(path):
        raise ConfigError(f'config {path}: no such file')
    if not path.lower().endswith(CONFIG_EXTENSIONS):
        raise ConfigError(f'config {path}: not a config file ({", ".join(CONFIG_EXTENSIONS)}); give the config '
                          'first, then the checkpoint')
    try:
        config = Config.fromfile(path)
    except Exception as error:  # noqa: BLE001  (a Python config can raise anything)
        raise ConfigError(f'config {path} cannot be read: {type(error).__name__}: {error}') from error
    model = config.get('model')
    if not isinstance(model, dict) or 'type' not in model:
        raise ConfigError(f'config {path} defines no model (a _base_ fragment?): give a complete config, such as '
                          'one of configs/vil/')
    found = _task_of(model)
    if task is not None and found != task:
        kind = f'a {found} config' if found else 'not a segmentation or classification config'
        hint = f': {TASKS[found][1]}' if found else ''
        raise ConfigError(f'config {path} is {kind} (its model has no {TASKS[task][0]}), where a {task} config is '
                          f'needed{hint}')
    return config
