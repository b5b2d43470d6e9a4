"""The likely cause of a checkpoint that does not fit its model, phrased as the fix (for CheckpointMismatchError).

Three ordinary mistakes are recognised from key names and shapes alone:

* another architecture, e.g. a DeiT segmentor checkpoint for a ViL config (recognised by characteristic keys);
* a bare backbone or an ImageNet classifier (converter output, released ``.th``) where a whole trained model is
  needed: whole parts of the model (decode head, ...) have no weights in the file;
* another number of classes: only the final classification layers differ, in their first dimension.
"""
import re
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

from torch import Tensor

if TYPE_CHECKING:
    from .checkpoint import StateDictMismatch

PARTIAL_LOAD_HINT = ('--allow-partial-load (or allow_partial_load=True in the config) loads only the matching '
                     'tensors and keeps the others at their initial values')

# Key fragments that only one backbone family has (our names and the official / MMSeg / MMPretrain / timm ones).
ARCHITECTURES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ('ViL (Vision-LSTM)', ('xlstm.blocks.', '.rowwise_from_top_left.', '.mixer.proj_up.', '.mixer.igate.')),
    ('Vim (Vision Mamba)', ('.mixer.A_log', '.mixer.A_b_log', '.forward_branch.A_log')),
    ('ViT/DeiT (self-attention)', ('.attn.qkv.', '.attn.attn.in_proj', '.attn.in_proj_weight', '.ffn.layers.')),
    ('ResNet (convolutional)', ('layer1.0.conv1.', 'stem.0.')),
)
# The last layer of a decode head (conv_seg) or classifier head (fc), whose first dimension is the class count.
CLASS_LAYER = re.compile(r'^(?P<head>(?:.*\.)?(?:decode_head|auxiliary_head|head))\.(?:conv_seg|fc|fc_cls)\.'
                         r'(?:weight|bias)$')


def architecture(keys) -> Optional[str]:
    """The backbone family whose characteristic key fragments occur in ``keys``, if exactly one does."""
    found = {name for name, fragments in ARCHITECTURES if any(f in f'.{k}' for k in keys for f in fragments)}
    return found.pop() if len(found) == 1 else None


def _top_level_parts(keys) -> Dict[str, int]:
    parts: Dict[str, int] = {}
    for key in keys:
        part = key.split('.', 1)[0]
        parts[part] = parts.get(part, 0) + 1
    return parts


def _other_architecture(own: Mapping[str, Tensor], loaded: Mapping[str, Tensor]) -> Optional[str]:
    model_arch, file_arch = architecture(own), architecture(loaded)
    if model_arch and file_arch and model_arch != file_arch:
        return (f'the checkpoint holds a {file_arch} model, but the config builds a {model_arch} one: use a '
                f'{model_arch} checkpoint with this config, or a config of the checkpoint\'s architecture')
    return None


def _missing_parts(own: Mapping[str, Tensor], loaded: Mapping[str, Tensor]) -> Optional[str]:
    model_parts, file_parts = _top_level_parts(own), _top_level_parts(loaded)
    if len(model_parts) < 2:
        return None
    absent = [part for part in model_parts if part not in file_parts]
    if not absent:
        return None
    if not set(file_parts) & set(model_parts):
        what = 'bare backbone weights (e.g. a converter\'s output or a released ImageNet .th)'
        init = "model.backbone.init_cfg=dict(type='Pretrained', checkpoint=PATH)"
    else:
        what = f'no weights for {", ".join(absent)} (e.g. an ImageNet classifier)'
        init = "model.backbone.init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix='backbone.')"
    return (f'the checkpoint holds {what}, not a trained model of this config: to train from it set {init}; '
            'testing and inference need a checkpoint of a run trained with this config '
            '(tools/model_converters/vil2mmpretrain.py turns a released ViL classifier into an MMPretrain one)')


def _class_count(mismatch: 'StateDictMismatch') -> Optional[str]:
    heads: Dict[str, Tuple[int, int]] = {}
    for key, loaded_shape, own_shape in mismatch.mismatched:
        match = CLASS_LAYER.match(key)
        if not match or loaded_shape[1:] != own_shape[1:]:
            return None
        heads[match.group('head')] = (loaded_shape[0], own_shape[0])
    if not heads:
        return None
    settings = ' '.join(f'model.{head}.num_classes={loaded}' for head, (loaded, _) in heads.items())
    counts = ', '.join(f'{head}: {loaded} in the checkpoint, {own} in the config' for head, (loaded, own) in
                       heads.items())
    return (f'another number of classes ({counts}): evaluate it with its own classes, e.g. --cfg-options '
            f'{settings} (and the matching dataset), or fine-tune it on these classes with --allow-partial-load, '
            'which starts the class layers from random')


def likely_fixes(own: Mapping[str, Tensor], loaded: Mapping[str, Tensor], mismatch: 'StateDictMismatch') -> List[str]:
    """The likely causes of ``mismatch`` with their fixes, most specific first; never empty."""
    for diagnose in (lambda: _other_architecture(own, loaded), lambda: _missing_parts(own, loaded)):
        cause = diagnose()
        if cause:
            return [cause]
    cause = _class_count(mismatch) if not mismatch.missing and not mismatch.unexpected else None
    if cause:
        return [cause]
    return [f'use a checkpoint trained with this config (same architecture, sizes and classes); {PARTIAL_LOAD_HINT}']
