"""Pure conversions of Vision-LSTM checkpoints into this package's key names (cf. timm's ``checkpoint_filter_fn``).

Five layouts are recognised by their key names (vil_spec.md §5-6, §10):

* ``'released'``: the released ``vil2_*.th`` files, training-code names (``xlstm.blocks.N...``, ``head.0/head.1``);
* ``'released_v1'``: the released v1 ``vil_*.th`` files (same names, causal conv ``xlstm.conv1d.conv`` of kernel 4);
* ``'official'``: ``VisionLSTM2.state_dict()`` names (``blocks.N.rowwise_from_top_left...``);
* ``'official_v1'``: ``VisionLSTM.state_dict()`` names (``blocks.N.layer...``, one block per index);
* ``'ours'``: :class:`~mmseg_vil.models.backbones.ViL` names, bare or under ``backbone.`` (MMSeg/MMPretrain models).

:func:`convert_vil_state_dict` maps any of them to ours: backbone keys bare, the classifier's
``LayerNorm -> Linear`` under ``head.norm`` / ``head.fc``. Official residual-weight norms store ``scale - 1``; ours
store the scale, so 1 is added to those weights. A state dict in our layout passes through unchanged, so
converting twice is harmless.
"""
import re
from collections import OrderedDict
from typing import Dict, Tuple

from torch import Tensor

StateDict = Dict[str, Tensor]

DIRECTIONS = ('rowwise_from_top_left', 'rowwise_from_bot_right')
VIL_FORMATS = ('released', 'released_v1', 'official', 'official_v1', 'ours')
V1_CONV_KERNEL_SIZE = 4


def detect_vil_format(state_dict: StateDict, source: str = 'checkpoint') -> str:
    """Return one of :data:`VIL_FORMATS`; raise ``ValueError`` naming ``source`` for anything else."""
    keys = list(state_dict)
    if any(k.startswith('xlstm.blocks.') for k in keys):
        # v1 convolves causally with kernel 4; VisionLSTM2 builds every conv with kernel 3, also a causal one.
        causal = [v for k, v in state_dict.items() if k.endswith('.xlstm.conv1d.conv.weight')]
        return 'released_v1' if causal and causal[0].shape[-1] == V1_CONV_KERNEL_SIZE else 'released'
    if any(f'.{DIRECTIONS[0]}.' in k for k in keys):
        return 'official'
    if any(re.match(r'blocks\.\d+\.layer\.', k) for k in keys):
        return 'official_v1'
    if any(re.match(r'(backbone\.)?layers\.\d+\.mixer\.', k) for k in keys):
        return 'ours'
    raise ValueError(f'Not a Vision-LSTM checkpoint ({source}): expected keys like "xlstm.blocks.0..." (released '
                     '.th), "blocks.0.rowwise_from_top_left..." (VisionLSTM2), "blocks.0.layer..." (VisionLSTM) or '
                     f'"layers.0.mixer..." (mmseg_vil); first keys: {keys[:5]}')


def _rename_training_keys(key: str) -> str:
    """The renames both hub preprocessings apply to training-code names."""
    key = key.replace('.xlstm.', '.layer.').replace('xlstm.', '', 1)
    return key.replace('.xlstm_norm.', '.norm.')


def released_to_official(state_dict: StateDict) -> StateDict:
    """Rename training-code keys of the released ``.th`` files to ``VisionLSTM2`` names (hubconf ``preprocess='v2'``)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if 'causal_mask' in key:  # a non-persistent buffer that some old checkpoints still carry
            continue
        key = _rename_training_keys(key).replace('.conv1d.', '.conv.')
        match = re.match(r'blocks\.(\d+)\.(.*)', key)
        if match:
            index = int(match.group(1))
            key = f'blocks.{index // 2}.{DIRECTIONS[index % 2]}.{match.group(2)}'
        key = {'post_blocks_norm.weight': 'norm.weight', 'post_blocks_norm.bias': 'norm.bias'}.get(key, key)
        key = re.sub(r'^head\.0\.', 'legacy_norm.', key)
        key = re.sub(r'^head\.1\.', 'head.', key)
        out[key] = value
    return out


def released_v1_to_official_v1(state_dict: StateDict) -> StateDict:
    """Rename training-code keys of the released v1 ``.th`` files to ``VisionLSTM`` names (``preprocess='v1'``)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if 'causal_mask' in key:
            continue
        key = _rename_training_keys(key)
        key = {'post_blocks_norm.weight': 'legacy_norm.weight'}.get(key, key)
        key = re.sub(r'^head\.0\.', 'norm.', key)
        key = re.sub(r'^head\.1\.', 'head.', key)
        out[key] = value
    return out


def _block_key(index: int, rest: str) -> Tuple[str, bool]:
    """Our name for an official sub-block key, and whether it is a residual-weight norm weight (needs + 1)."""
    rest = re.sub(r'^layer\.(conv1d|conv)\.conv\.', 'mixer.conv.', rest)  # causal conv: a Conv1d inside a module
    rest = re.sub(r'^layer\.(mlstm_cell\.)?', 'mixer.', rest)
    return f'layers.{index}.{rest}', rest in ('norm.weight', 'mixer.outnorm.weight')


def official_to_ours(state_dict: StateDict, v1: bool = False) -> StateDict:
    """Rename ``VisionLSTM2`` (or, with ``v1``, ``VisionLSTM``) keys to ours; residual-weight offsets become scales.

    The norm after the blocks is residual-weight in VisionLSTM2 (``norm``) and v1 (``legacy_norm``); the plain
    LayerNorm after it (VisionLSTM2 ``legacy_norm``, v1 ``norm``) belongs to the classifier (``head.norm``) or, in a
    v1 feature extractor (no ``head``), is the backbone's ``out_norm``.
    """
    final_norm, plain_norm = ('legacy_norm', 'norm') if v1 else ('norm', 'legacy_norm')
    plain_target = 'head.norm' if 'head.weight' in state_dict or not v1 else 'out_norm'
    renames = {'patch_embed.proj.weight': 'patch_embed.weight', 'patch_embed.proj.bias': 'patch_embed.bias',
               'pos_embed.embed': 'pos_embed', f'{final_norm}.weight': 'norm.weight',
               f'{final_norm}.bias': 'norm.bias', f'{plain_norm}.weight': f'{plain_target}.weight',
               f'{plain_norm}.bias': f'{plain_target}.bias', 'head.weight': 'head.fc.weight',
               'head.bias': 'head.fc.bias'}
    block_pattern = r'blocks\.(\d+)\.(norm\..*|layer\..*)' if v1 else r'blocks\.(\d+)\.(\w+)\.(.*)'
    out = OrderedDict()
    for key, value in state_dict.items():
        match = re.fullmatch(block_pattern, key)
        if match and v1:
            new_key, offset_norm = _block_key(int(match.group(1)), match.group(2))
        elif match:
            index = 2 * int(match.group(1)) + DIRECTIONS.index(match.group(2))
            new_key, offset_norm = _block_key(index, match.group(3))
        else:
            new_key, offset_norm = renames.get(key, key), key == f'{final_norm}.weight'
        out[new_key] = value + 1 if offset_norm else value
    return out


def convert_vil_state_dict(state_dict: StateDict, source: str = 'checkpoint') -> StateDict:
    """Convert a checkpoint in any recognised layout to ours (backbone keys bare, classifier under ``head.``)."""
    fmt = detect_vil_format(state_dict, source)
    if fmt == 'released':
        return official_to_ours(released_to_official(state_dict))
    if fmt == 'released_v1':
        return official_to_ours(released_v1_to_official_v1(state_dict), v1=True)
    if fmt in ('official', 'official_v1'):
        return official_to_ours(state_dict, v1=fmt == 'official_v1')
    if any(k.startswith('backbone.') for k in state_dict):  # a full MMSeg/MMPretrain model checkpoint
        return OrderedDict((k[len('backbone.'):] if k.startswith('backbone.') else k, v)
                           for k, v in state_dict.items() if k.startswith(('backbone.', 'head.')))
    return OrderedDict(state_dict)


def split_backbone_and_head(state_dict: StateDict) -> Tuple[StateDict, StateDict]:
    """Split a converted state dict into backbone keys and ``head.*`` keys (prefix removed)."""
    backbone = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith('head.'))
    head = OrderedDict((k[len('head.'):], v) for k, v in state_dict.items() if k.startswith('head.'))
    return backbone, head
