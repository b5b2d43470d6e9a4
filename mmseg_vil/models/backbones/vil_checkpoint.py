"""Pure conversions of Vision-LSTM checkpoints into this package's key names (cf. timm's ``checkpoint_filter_fn``).

Three layouts are recognised by their key names (vil_spec.md §5-6):

* ``'released'``: the released ``vil2_*.th`` files, training-code names (``xlstm.blocks.N...``, ``head.0/head.1``);
* ``'official'``: ``VisionLSTM2.state_dict()`` names (``blocks.N.rowwise_from_top_left...``);
* ``'ours'``: :class:`~mmseg_vil.models.backbones.ViL` names, bare or under ``backbone.`` (MMSeg/MMPretrain models).

:func:`convert_vil_state_dict` maps any of them to ours: backbone keys bare, the released classifier's
``LayerNorm -> Linear`` under ``head.norm`` / ``head.fc``. Official residual-weight norms store ``scale - 1``; ours
store the scale, so 1 is added to those weights.
"""
import re
from collections import OrderedDict
from typing import Dict, Tuple

from torch import Tensor

StateDict = Dict[str, Tensor]

DIRECTIONS = ('rowwise_from_top_left', 'rowwise_from_bot_right')


def detect_vil_format(state_dict: StateDict, source: str = 'checkpoint') -> str:
    """Return ``'released'``, ``'official'`` or ``'ours'``; raise ``ValueError`` naming ``source`` for anything else."""
    keys = list(state_dict)
    if any(k.startswith('xlstm.blocks.') for k in keys):
        return 'released'
    if any(f'.{DIRECTIONS[0]}.' in k for k in keys):
        return 'official'
    if any(re.match(r'(backbone\.)?layers\.\d+\.mixer\.', k) for k in keys):
        return 'ours'
    raise ValueError(f'Not a Vision-LSTM checkpoint ({source}): expected keys like "xlstm.blocks.0..." (released .th), '
                     '"blocks.0.rowwise_from_top_left..." (VisionLSTM2) or "layers.0.mixer..." (mmseg_vil); '
                     f'first keys: {keys[:5]}')


def released_to_official(state_dict: StateDict) -> StateDict:
    """Rename training-code keys of the released ``.th`` files to ``VisionLSTM2`` names (hubconf ``preprocess='v2'``)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if 'causal_mask' in key:  # a non-persistent buffer that some old checkpoints still carry
            continue
        key = key.replace('.xlstm.', '.layer.').replace('xlstm.', '', 1)
        key = key.replace('.xlstm_norm.', '.norm.').replace('.conv1d.', '.conv.')
        match = re.match(r'blocks\.(\d+)\.(.*)', key)
        if match:
            index = int(match.group(1))
            key = f'blocks.{index // 2}.{DIRECTIONS[index % 2]}.{match.group(2)}'
        key = {'post_blocks_norm.weight': 'norm.weight', 'post_blocks_norm.bias': 'norm.bias'}.get(key, key)
        key = re.sub(r'^head\.0\.', 'legacy_norm.', key)
        key = re.sub(r'^head\.1\.', 'head.', key)
        out[key] = value
    return out


def _official_block_key(pair: int, direction: str, rest: str) -> Tuple[str, bool]:
    """Our name for a sub-block key, and whether it is a residual-weight norm weight (needs + 1)."""
    index = 2 * pair + DIRECTIONS.index(direction)
    rest = re.sub(r'^layer\.(mlstm_cell\.)?', 'mixer.', rest)
    return f'layers.{index}.{rest}', rest in ('norm.weight', 'mixer.outnorm.weight')


def official_to_ours(state_dict: StateDict) -> StateDict:
    """Rename ``VisionLSTM2`` keys to ours and turn residual-weight norm offsets into scales."""
    renames = {'patch_embed.proj.weight': 'patch_embed.weight', 'patch_embed.proj.bias': 'patch_embed.bias',
               'pos_embed.embed': 'pos_embed', 'legacy_norm.weight': 'head.norm.weight',
               'legacy_norm.bias': 'head.norm.bias', 'head.weight': 'head.fc.weight', 'head.bias': 'head.fc.bias'}
    out = OrderedDict()
    for key, value in state_dict.items():
        match = re.match(r'blocks\.(\d+)\.(\w+)\.(.*)', key)
        if match:
            new_key, offset_norm = _official_block_key(int(match.group(1)), match.group(2), match.group(3))
        else:
            new_key, offset_norm = renames.get(key, key), key == 'norm.weight'
        out[new_key] = value + 1 if offset_norm else value
    return out


def convert_vil_state_dict(state_dict: StateDict, source: str = 'checkpoint') -> StateDict:
    """Convert a checkpoint in any recognised layout to ours (backbone keys bare, classifier under ``head.``)."""
    fmt = detect_vil_format(state_dict, source)
    if fmt == 'released':
        return official_to_ours(released_to_official(state_dict))
    if fmt == 'official':
        return official_to_ours(state_dict)
    if any(k.startswith('backbone.') for k in state_dict):  # a full MMSeg/MMPretrain model checkpoint
        return OrderedDict((k[len('backbone.'):] if k.startswith('backbone.') else k, v)
                           for k, v in state_dict.items() if k.startswith(('backbone.', 'head.')))
    return OrderedDict(state_dict)


def split_backbone_and_head(state_dict: StateDict) -> Tuple[StateDict, StateDict]:
    """Split a converted state dict into backbone keys and ``head.*`` keys (prefix removed)."""
    backbone = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith('head.'))
    head = OrderedDict((k[len('head.'):], v) for k, v in state_dict.items() if k.startswith('head.'))
    return backbone, head
