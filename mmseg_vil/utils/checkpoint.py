"""The package's one checkpoint-loading policy: read weights-only, compare every key and shape, explain, then load.

MMEngine's loaders (``load_from``, ``PretrainedInit``, ``mmseg.apis.init_model``, the inferencers) load with
``strict=False`` and only log mismatches, which silently leaves random weights in a model. Every loading path of
this package (backbone ``init_cfg``, ``tools/train.py --load-from/--resume``, ``tools/test.py``, ``tools/infer.py``,
``tools/compare.py``, ``tools/classify.py`` and the APIs behind them) instead calls
:func:`load_state_dict_strictly`: a missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError`
listing them with the likely cause and its fix (:mod:`.checkpoint_hints`), before any training or inference.
``allow_partial=True`` is the explicit opt-in to load only the matching tensors; what stays at its initial value is
logged.
"""
import logging
import os.path as osp
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor, nn

from .checkpoint_hints import likely_fixes

StateDict = Dict[str, Tensor]
SHOWN_KEYS = 20  # per list in an error message; the count is always complete


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into; the message lists the offending keys and the fix."""


def read_checkpoint(path: str) -> Tuple[StateDict, dict]:
    """The tensors and the ``meta`` dict of a checkpoint file, read with ``weights_only=True``.

    Accepts a bare state dict or one wrapped under ``'state_dict'``, ``'model'`` or ``'module'`` (MMEngine runner
    checkpoints, released ``.th`` files, timm/DeiT files); a ``module.`` prefix (DDP) is removed as MMEngine does.
    A file that is not a weights-only PyTorch checkpoint raises :class:`CheckpointMismatchError` naming it (a missing
    or unreadable one, ``OSError``).
    """
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001  (unpickling other bytes fails with any error: KeyError, IndexError...)
        raise CheckpointMismatchError(f'{path} is not a readable weights-only PyTorch checkpoint (a truncated file, '
                                      f'another format, or objects beyond tensors): {type(error).__name__}: {error}'
                                      ) from error
    meta = (ckpt.get('meta') or {}) if isinstance(ckpt, Mapping) else {}
    for wrapper in ('state_dict', 'model', 'module'):
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get(wrapper), Mapping):
            ckpt = ckpt[wrapper]
            break
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatchError(f'{path}: expected a state dict, got {type(ckpt).__name__}')
    return state_dict_tensors(ckpt), dict(meta)


def read_conversion_source(src: str, dst: str) -> StateDict:
    """The tensors of a converter's ``src`` (see :func:`read_checkpoint`), read only if the conversion may go ahead:
    a converter replaces no file (neither the source, when the arguments repeat it, nor any other), so a mistyped
    path costs nothing. A missing ``src`` or an existing ``dst`` raises ``ValueError``."""
    if not osp.isfile(src):
        raise ValueError(f'{src}: no such checkpoint file')
    if osp.exists(dst):
        what = 'is the source checkpoint' if osp.samefile(src, dst) else 'exists'
        raise ValueError(f'{dst} {what}: the converter writes a new file; name another output path')
    return read_state_dict(src)


def state_dict_tensors(state_dict: Mapping[str, object]) -> StateDict:
    """The tensors of a state dict, without the ``module.`` prefix a DDP-wrapped model writes (as MMEngine)."""
    return OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                       for k, v in state_dict.items() if isinstance(v, Tensor))


def read_state_dict(path: str, prefix: Optional[str] = None) -> StateDict:
    """The tensors of a checkpoint file (see :func:`read_checkpoint`).

    ``prefix`` (e.g. ``'backbone.'``) keeps only the keys under it, with the prefix removed.
    """
    state_dict, _ = read_checkpoint(path)
    if prefix:
        state_dict = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix))
        if not state_dict:
            raise CheckpointMismatchError(f'{path}: no key starts with prefix {prefix!r}')
    return state_dict


@dataclass
class StateDictMismatch:
    """How a state dict differs from a model's: keys only in the model, only in the file, and shape differences."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, file, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def listing(self) -> str:
        shapes = [f'{key} {loaded} vs model {own}' for key, loaded, own in self.mismatched]
        return _listing('missing', self.missing) + _listing('unexpected', self.unexpected) + _listing(
            'shape mismatch', shapes)


def _listing(title: str, items: Sequence[str]) -> str:
    if not items:
        return ''
    more = f', ... and {len(items) - SHOWN_KEYS} more' if len(items) > SHOWN_KEYS else ''
    return f'\n  {title} ({len(items)}): ' + ', '.join(items[:SHOWN_KEYS]) + more


def compare_state_dicts(own: Mapping[str, Tensor], loaded: Mapping[str, Tensor]) -> StateDictMismatch:
    """Compare a model's state dict with a loaded one. A missing BatchNorm ``num_batches_tracked`` is tolerated, as
    PyTorch's strict loading does for checkpoints written before that buffer existed."""
    return StateDictMismatch(
        missing=[k for k in own if k not in loaded and not k.endswith('num_batches_tracked')],
        unexpected=[k for k in loaded if k not in own],
        mismatched=[(k, tuple(loaded[k].shape), tuple(own[k].shape))
                    for k in own if k in loaded and loaded[k].shape != own[k].shape])


def adapt_to_model(module: nn.Module, state_dict: Mapping[str, Tensor]) -> StateDict:
    """A copy of ``state_dict`` after the model's own load-time adaptations (its ``load_state_dict`` pre-hooks,
    e.g. ViL resampling a position embedding to its grid), so that they are not reported as mismatches."""
    adapted = OrderedDict(state_dict)
    for name, submodule in module.named_modules():
        for hook in submodule._load_state_dict_pre_hooks.values():
            hook(adapted, f'{name}.' if name else '', {}, True, [], [], [])
    return adapted


def checked_state_dict(module: nn.Module,
                       state_dict: Mapping[str, Tensor],
                       source: str = 'checkpoint',
                       allow_partial: bool = False) -> StateDict:
    """What the policy lets ``module`` load from ``state_dict``: all of it (adapted to the model) when every key and
    shape matches, else :class:`CheckpointMismatchError` listing the differences and the likely fix.

    With ``allow_partial`` only the matching tensors are returned and the others are logged; it still raises when
    nothing matches.
    """
    state_dict = adapt_to_model(module, state_dict)
    own = module.state_dict()
    mismatch = compare_state_dicts(own, state_dict)
    if not mismatch:
        return state_dict
    shape_mismatched = {key for key, _, _ in mismatch.mismatched}
    matching = OrderedDict((k, v) for k, v in state_dict.items() if k in own and k not in shape_mismatched)
    if not allow_partial or all(k.endswith('num_batches_tracked') for k in matching):  # counters are no weights
        reason = 'nothing in it matches, so even a partial load is refused' if allow_partial else 'nothing loaded'
        fixes = likely_fixes(own, state_dict, mismatch)
        raise CheckpointMismatchError(f'{source} does not fit {type(module).__name__} ({reason}):' +
                                      mismatch.listing() + ''.join(f'\n  likely fix: {fix}' for fix in fixes))
    print_log(f'Partial load of {source} into {type(module).__name__}, allowed explicitly: {len(matching)} tensors '
              'loaded; the missing and mis-shaped ones keep their initial values, the unexpected ones are ignored:' +
              mismatch.listing(), logger='current', level=logging.WARNING)
    return matching


def load_state_dict_strictly(module: nn.Module,
                             state_dict: Mapping[str, Tensor],
                             source: str = 'checkpoint',
                             allow_partial: bool = False) -> None:
    """Load what :func:`checked_state_dict` allows into ``module``."""
    module.load_state_dict(checked_state_dict(module, state_dict, source, allow_partial), strict=not allow_partial)
