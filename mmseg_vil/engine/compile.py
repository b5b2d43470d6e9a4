# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""``compile`` in a config: torch.compile of the network parts, not of MMEngine's ``train_step``.

MMEngine's own ``compile=True`` compiles ``model.train_step``, which traces its optimizer wrapper and autocast
context; under torch 2.14 Dynamo fails in MMEngine's autocast version check. Compiling the parts that compute
(backbone, decode and auxiliary heads) gives the speed without tracing the training loop, keeps the state-dict keys
unchanged (checkpoints load into uncompiled models) and works with ``--amp`` and DDP.

``compile=True`` uses torch.compile's defaults; a mode name (``compile=reduce-overhead`` on the command line) or a
dict of torch.compile options (``compile.mode=reduce-overhead``) picks others. Modes with CUDA graphs
(``reduce-overhead``, ``max-autotune``) compile the training steps only, whose crops have one size: validation and
testing run the parts eagerly. There each image size would record graphs of its own, and in inference the graph
trees start a new step at every compiled call, so the heads' call overwrote the backbone's outputs they read
(RuntimeError "accessing tensor output of CUDAGraphs that has been overwritten", H100, 2026-12-08).
"""
import functools
from typing import Callable, Optional, Union

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import nn

COMPILED_PARTS = ('backbone', 'decode_head', 'auxiliary_head')
MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')


def take_compile_options(cfg: Config) -> Optional[dict]:
    """Remove ``compile`` from ``cfg`` (so MMEngine does not compile ``train_step``) and return torch.compile options.

    An empty dict means compile with defaults; ``None`` (no ``compile`` key, or ``False``) means do not compile.
    """
    options: Union[bool, str, dict, None] = cfg.pop('compile', None)
    if options is None or options is False:
        return None
    if options is True:
        return {}
    if isinstance(options, str) and options in MODES:
        return {'mode': options}
    if not isinstance(options, dict):
        raise TypeError(f'compile must be True, False, a torch.compile mode {MODES} or a dict of torch.compile '
                        f'options, got {options!r}; on the command line: --cfg-options compile=True, '
                        'compile=reduce-overhead or compile.mode=reduce-overhead')
    return dict(options)


def uses_cuda_graphs(options: dict) -> bool:
    """Whether torch.compile ``options`` replay CUDA graphs (a mode that does, or Inductor's ``triton.cudagraphs``)."""
    return options.get('mode') in CUDA_GRAPH_MODES or bool(options.get('options', {}).get('triton.cudagraphs'))


def compile_parts(model: nn.Module, options: dict) -> list:
    """torch.compile the model's backbone and heads in place; returns the names of the compiled parts.

    Heads are called through ``self.forward(...)`` inside their ``loss``/``predict``, so their ``forward`` is
    replaced by its compiled version; the backbone is called as a module, so ``nn.Module.compile`` suffices. With CUDA
    graphs (:func:`uses_cuda_graphs`) every part's ``forward`` runs compiled only while it trains with gradients.
    """
    model = getattr(model, 'module', model)  # DDP wraps the segmentor
    training_only = uses_cuda_graphs(options)
    compiled = []
    for name in COMPILED_PARTS:
        part = getattr(model, name, None)
        if not isinstance(part, nn.Module):
            continue
        if training_only:
            part.forward = _when_training(part, torch.compile(part.forward, **options))
        elif name == 'backbone':
            part.compile(**options)
        else:
            part.forward = torch.compile(part.forward, **options)
        compiled.append(name)
    if not compiled:
        raise ValueError(f'compile: {type(model).__name__} has none of {COMPILED_PARTS} to compile')
    where = (' for training steps only (evaluation and inference run eagerly; compile=True compiles them too)'
             if training_only else '')
    print_log(f'compile: torch.compile({options}) on {", ".join(compiled)}{where} (not on train_step); the first '
              'iterations are slow while it compiles', logger='current')
    return compiled


def _when_training(part: nn.Module, compiled: Callable) -> Callable:
    """``part``'s forward that calls ``compiled`` while ``part`` trains with gradients enabled, else the eager one."""
    eager = part.forward

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        return (compiled if part.training and torch.is_grad_enabled() else eager)(*args, **kwargs)

    return forward
