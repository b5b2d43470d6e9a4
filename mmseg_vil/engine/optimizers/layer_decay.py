# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Layer-wise learning-rate decay (LLRD) for isotropic backbones inside MMSegmentation segmentors.

Fine-tuning recipes of plain backbones (BEiT, MAE, the official ViL UperNet) scale the learning rate of a parameter
by ``layer_decay_rate ** (num_layers - 1 - layer_id)``: the stem gets the smallest rate, the decoder the full one.
Neither library can do this for our models: MMSegmentation's ``LearningRateDecayOptimizerConstructor`` dispatches on
the backbone's class name (only ConvNeXt, BEiT and MAE), and MMPretrain's constructor needs ``get_layer_depth`` on
the top-level model, which an ``EncoderDecoder`` lacks. This constructor asks, in order:

1. the model's own ``get_layer_depth(name)`` (MMPretrain classifiers delegate to their backbone);
2. ``model.backbone.get_layer_depth(name, 'backbone.')`` (ViL, Vim, MMPretrain backbones);
3. for backbones without it whose blocks are ``backbone.layers.<i>`` (MMSegmentation's ``VisionTransformer``),
   :func:`layer_depth_by_name`.

``paramwise_cfg`` keys:

* ``layer_decay_rate`` (float, default 1.0: no decay).
* ``norm_decay_mult``, ``bias_decay_mult``, ``flat_decay_mult``: weight-decay multipliers of normalisation-layer
  parameters, biases and any other 1-D parameters (MMEngine's meaning; unset keeps the full weight decay).
* ``custom_keys``: ``{substring: dict(lr_mult=..., decay_mult=...)}``; the longest matching key wins and overrides
  the three rules above; ``lr_mult`` multiplies the layer-wise rate.

Names returned by ``no_weight_decay()`` of the model or its backbone never get weight decay.
"""
from collections import defaultdict
from functools import partial
from typing import Callable, Dict, List, Optional, Set, Tuple

from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.utils.dl_utils.parrots_wrapper import _BatchNorm, _InstanceNorm
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

try:
    from mmpretrain.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMPRETRAIN_CONSTRUCTORS
except ImportError:  # mmpretrain is the optional "cls" extra
    MMPRETRAIN_CONSTRUCTORS = None

NORM_LAYERS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
STEM_NAMES = ('cls_token', 'pos_embed', 'patch_embed')

LayerDepthFn = Callable[[str], Tuple[int, int]]


def layer_depth_by_name(param_name: str, num_layers: int, prefix: str = 'backbone.') -> Tuple[int, int]:
    """Layer id of a ViT-style parameter from its name, for backbones without ``get_layer_depth``.

    Class token, position and patch embedding are layer 0, ``layers.<i>`` is layer ``i + 1``, everything else
    (final norm, neck, heads) is the top layer ``num_layers + 1``. Returns ``(layer_id, num_layers + 2)``.
    """
    total = num_layers + 2
    if not param_name.startswith(prefix):
        return total - 1, total
    name = param_name[len(prefix):]
    if name.startswith(STEM_NAMES):
        return 0, total
    if name.startswith('layers.'):
        return int(name.split('.')[1]) + 1, total
    return total - 1, total


def find_layer_depth_fn(model: nn.Module) -> LayerDepthFn:
    """The function mapping a parameter name of ``model`` to ``(layer_id, num_layers)``."""
    if hasattr(model, 'get_layer_depth'):
        return model.get_layer_depth
    backbone = getattr(model, 'backbone', None)
    if hasattr(backbone, 'get_layer_depth'):
        return partial(backbone.get_layer_depth, prefix='backbone.')
    if isinstance(getattr(backbone, 'layers', None), nn.ModuleList):
        return partial(layer_depth_by_name, num_layers=len(backbone.layers))
    raise NotImplementedError(
        f'Layer-wise lr decay needs get_layer_depth() on {type(model).__name__} or on its backbone '
        f'({type(backbone).__name__}), or a backbone whose blocks are the ModuleList `layers`')


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """Full parameter names listed by ``no_weight_decay()`` of the model and of its backbone."""
    names = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    backbone = getattr(model, 'backbone', None)
    if hasattr(backbone, 'no_weight_decay'):
        names |= {f'backbone.{name}' for name in backbone.no_weight_decay()}
    return names


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """One optimizer parameter group per parameter, with a layer-wise lr scale and its weight decay.

    Every group records ``param_name``, ``layer_id`` and ``lr_scale`` so that tests and tools can inspect it.
    See the module docstring for ``paramwise_cfg``.

    Example::

        optim_wrapper = dict(
            type='OptimWrapper',
            optimizer=dict(type='AdamW', lr=5e-4, weight_decay=0.05),
            constructor='LayerDecayOptimWrapperConstructor',
            paramwise_cfg=dict(layer_decay_rate=0.65, flat_decay_mult=0.0))
    """

    def add_params(self, params: List[dict], module: nn.Module) -> None:
        """Append a parameter group for every trainable parameter of ``module`` (the whole model) to ``params``."""
        cfg = self.paramwise_cfg
        rate = cfg.get('layer_decay_rate', 1.0)
        layer_depth = find_layer_depth_fn(module)
        no_decay = no_weight_decay_names(module)
        custom_keys = cfg.get('custom_keys', {})
        sorted_keys = sorted(sorted(custom_keys), key=len, reverse=True)
        seen = set()
        for module_name, submodule in module.named_modules():
            for short_name, param in submodule.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                name = f'{module_name}.{short_name}' if module_name else short_name
                layer_id, num_layers = layer_depth(name)
                scale = rate**(num_layers - 1 - layer_id)
                group = dict(params=[param], param_name=name, layer_id=layer_id, lr_scale=scale)
                custom = next((custom_keys[key] for key in sorted_keys if key in name), {})
                group['lr'] = self.base_lr * scale * custom.get('lr_mult', 1.0)
                if self.base_wd is not None:
                    group['weight_decay'] = 0.0 if name in no_decay else self.base_wd * self._decay_mult(
                        custom, short_name, param.ndim, isinstance(submodule, NORM_LAYERS))
                params.append(group)
        log_layer_groups(params)

    def _decay_mult(self, custom: dict, short_name: str, ndim: int, in_norm_layer: bool) -> float:
        """Weight-decay multiplier: a matching custom key wins, then norm, bias and 1-D rules, MMEngine's order."""
        if 'decay_mult' in custom:
            return custom['decay_mult']
        rules = ((in_norm_layer, 'norm_decay_mult'), (short_name == 'bias', 'bias_decay_mult'),
                 (ndim == 1, 'flat_decay_mult'))
        for applies, key in rules:
            if applies and self.paramwise_cfg.get(key) is not None:
                return self.paramwise_cfg[key]
        return 1.0


def log_layer_groups(params: List[dict], logger: Optional[MMLogger] = None) -> None:
    """Log one line per layer: its lr scale and how many parameter tensors do and do not get weight decay."""
    logger = logger or MMLogger.get_current_instance()
    layers: Dict[int, List[dict]] = defaultdict(list)
    for group in params:
        layers[group['layer_id']].append(group)
    lines = ['Layer-wise lr decay groups (layer: lr scale, lr, tensors with / without weight decay):']
    for layer_id in sorted(layers):
        groups = layers[layer_id]
        decayed = sum(1 for g in groups if g.get('weight_decay', 1.0) > 0)
        lines.append(f'  layer {layer_id:2d}: x{groups[0]["lr_scale"]:.4g}, lr {groups[0]["lr"]:.3g}, '
                     f'{decayed} / {len(groups) - decayed}')
    logger.info('\n'.join(lines))


if MMPRETRAIN_CONSTRUCTORS is not None:
    MMPRETRAIN_CONSTRUCTORS.register_module(module=LayerDecayOptimWrapperConstructor)
