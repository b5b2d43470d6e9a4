# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""``compile`` in a config: torch.compile of the network parts, not of MMEngine's ``train_step``.

MMEngine's own ``compile=True`` compiles ``model.train_step``, which traces its optimizer wrapper and autocast
context; under torch 2.14 Dynamo fails in MMEngine's autocast version check. Compiling the parts that compute
(backbone, decode and auxiliary heads) gives the speed without tracing the training loop, keeps the state-dict keys
unchanged (checkpoints load into uncompiled models) and works with ``--amp`` and DDP.

``compile=True`` uses torch.compile's defaults; ``compile=dict(mode='reduce-overhead')`` adds CUDA graphs for the
fixed-size training crops (variable-size evaluation images re-record graphs per shape; prefer the default mode when
validation sizes vary).
"""
from typing import Union

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import nn

COMPILED_PARTS = ('backbone', 'decode_head', 'auxiliary_head')


def take_compile_options(cfg: Config) -> dict:
    """Remove ``compile`` from ``cfg`` (so MMEngine does not compile ``train_step``) and return torch.compile options.

    An empty dict means compile with defaults; ``None`` (no ``compile`` key, or ``False``) means do not compile.
    """
    options: Union[bool, dict, None] = cfg.pop('compile', None)
    if options is None or options is False:
        return None
    if options is True:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f'compile must be True, False or a dict of torch.compile options, got {options!r}')
    return dict(options)


def compile_parts(model: nn.Module, options: dict) -> list:
    """torch.compile the model's backbone and heads in place; returns the names of the compiled parts.

    Heads are called through ``self.forward(...)`` inside their ``loss``/``predict``, so their ``forward`` is
    replaced by its compiled version; the backbone is called as a module, so ``nn.Module.compile`` suffices.
    """
    model = getattr(model, 'module', model)  # DDP wraps the segmentor
    compiled = []
    for name in COMPILED_PARTS:
        part = getattr(model, name, None)
        if not isinstance(part, nn.Module):
            continue
        if name == 'backbone':
            part.compile(**options)
        else:
            part.forward = torch.compile(part.forward, **options)
        compiled.append(name)
    if not compiled:
        raise ValueError(f'compile: {type(model).__name__} has none of {COMPILED_PARTS} to compile')
    print_log(f'compile: torch.compile({options}) on {", ".join(compiled)} (not on train_step); the first '
              'iterations are slow while it compiles', logger='current')
    return compiled
