"""Checkpoint reading and strict, explained state-dict loading shared by every backbone of the package.

MMEngine's ``PretrainedInit`` loads with ``strict=False`` and only logs mismatches, which silently leaves random
weights in a model. Backbones of this package instead call :func:`load_state_dict_strictly`, which raises
:class:`CheckpointMismatchError` listing every missing, unexpected and shape-mismatched key.
"""
from collections import OrderedDict
from typing import Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

StateDict = Dict[str, Tensor]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into; the message lists the offending keys."""


def read_state_dict(path: str, prefix: Optional[str] = None) -> StateDict:
    """Read the tensors of a checkpoint file with ``weights_only=True``.

    Accepts a bare state dict or one wrapped under ``'state_dict'``, ``'model'`` or ``'module'`` (MMEngine runner
    checkpoints, released ``.th`` files, timm/DeiT files). ``prefix`` (e.g. ``'backbone.'``) keeps only the keys
    under it, with the prefix removed.
    """
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model', 'module'):
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get(wrapper), Mapping):
            ckpt = ckpt[wrapper]
            break
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatchError(f'{path}: expected a state dict, got {type(ckpt).__name__}')
    state_dict = OrderedDict((k, v) for k, v in ckpt.items() if isinstance(v, Tensor))
    if prefix:
        state_dict = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix))
        if not state_dict:
            raise CheckpointMismatchError(f'{path}: no key starts with prefix {prefix!r}')
    return state_dict


def _listing(title: str, keys: Iterable[str]) -> str:
    keys = list(keys)
    return f'\n  {title} ({len(keys)}): ' + ', '.join(keys) if keys else ''


def load_state_dict_strictly(module: nn.Module, state_dict: Mapping[str, Tensor], source: str = 'checkpoint') -> None:
    """Load ``state_dict`` into ``module``; any missing, unexpected or mis-shaped key raises with the full list."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f'{source} does not match {type(module).__name__}:' + _listing('missing', missing) +
            _listing('unexpected', unexpected) + _listing('shape mismatch', mismatched))
    module.load_state_dict(state_dict, strict=True)
