"""The official ``VisionMamba`` constructor options (hustvl/Vim ``vim/models_mamba.py``) as a :class:`~.vim.Vim` config.

:func:`vim_config_from_official` turns the kwargs a model was trained with into the equivalent backbone (reading
out what the official ``forward_features`` returns) and classifier head; the backbone computes the same function
from the same state dict. An option or value this package does not reproduce raises a ``ValueError`` naming it
and the supported values.
"""
import warnings
from typing import Any, Dict, Mapping, Optional

from ..layers.mamba import BIMAMBA_TYPES

# Constructor defaults of VisionMamba at the commit of vim_spec.md; any other keyword lands in its **kwargs and is
# ignored (the released Vim-B entry passes the misspelt if_devide_out).
VISION_MAMBA_DEFAULTS = dict(
    img_size=224, patch_size=16, stride=16, depth=24, embed_dim=192, d_state=16, channels=3, num_classes=1000,
    ssm_cfg=None, drop_rate=0.0, drop_path_rate=0.1, norm_epsilon=1e-5, rms_norm=True, initializer_cfg=None,
    fused_add_norm=True, residual_in_fp32=True, device=None, dtype=None, ft_seq_len=None, pt_hw_seq_len=14,
    if_bidirectional=False, final_pool_type='none', if_abs_pos_embed=True, if_rope=False, if_rope_residual=False,
    flip_img_sequences_ratio=-1.0, if_bimamba=False, bimamba_type='v2', if_cls_token=True, if_divide_out=True,
    init_layer_scale=None, use_double_cls_token=False, use_middle_cls_token=True)
# ssm_cfg keys (Mamba arguments) with an effect on a trained model that Vim reproduces; use_fast_path only selects
# kernels computing the same function.
SSM_CFG_KEYS = ('d_conv', 'expand', 'dt_rank', 'use_fast_path')
POOLED_OUT_TYPES = {'mean': 'mean_pooled', 'none': 'last_token'}


def _refuse(option: str, value: Any, supported: str) -> ValueError:
    return ValueError(f'official option {option}={value!r} is not supported; supported: {supported}')


def _mixer_arch(options: Dict[str, Any]) -> dict:
    ssm_cfg = dict(options['ssm_cfg'] or {})
    for key in ssm_cfg:
        if key not in SSM_CFG_KEYS:
            raise _refuse(f'ssm_cfg[{key!r}]', ssm_cfg[key], f'the keys {", ".join(SSM_CFG_KEYS)}')
    dt_rank = ssm_cfg.get('dt_rank', 'auto')
    return dict(embed_dims=options['embed_dim'], num_layers=options['depth'], d_state=options['d_state'],
                d_conv=ssm_cfg.get('d_conv', 4), expand=ssm_cfg.get('expand', 2),
                dt_rank=None if dt_rank == 'auto' else dt_rank)


def _check_refused(options: Dict[str, Any]) -> None:
    for option, supported in (('if_bidirectional', False), ('initializer_cfg', None), ('device', None),
                              ('dtype', None)):
        if options[option] != supported:
            raise _refuse(option, options[option], repr(supported))
    if options['flip_img_sequences_ratio'] > 0:
        raise _refuse('flip_img_sequences_ratio', options['flip_img_sequences_ratio'],
                      'a value <= 0 (the official model flips the sequence at random, in eval mode too)')
    if not isinstance(options['patch_size'], int):
        raise _refuse('patch_size', options['patch_size'], 'an int (square patches)')
    if options['bimamba_type'] not in BIMAMBA_TYPES and not options['if_bimamba']:
        raise _refuse('bimamba_type', options['bimamba_type'], ', '.join(BIMAMBA_TYPES))


def _readout(options: Dict[str, Any]) -> dict:
    """The backbone arguments that give what the official ``forward_features`` returns."""
    if options['if_cls_token']:
        cls_position = ('double' if options['use_double_cls_token'] else
                        'middle' if options['use_middle_cls_token'] else 'head')
        if options['if_rope'] and cls_position == 'double':
            raise _refuse('use_double_cls_token', True, 'False with if_rope=True (the official rotary embedding '
                          'fails on two class tokens)')
        return dict(with_cls_token=True, cls_position=cls_position, out_type='cls_token')
    pool = options['final_pool_type']
    if pool not in POOLED_OUT_TYPES:
        raise _refuse('final_pool_type', pool, f'{sorted(POOLED_OUT_TYPES)} without a class token ("max" and '
                      '"all" pool the logits of every token)')
    return dict(with_cls_token=False, out_type=POOLED_OUT_TYPES[pool])


def vim_config_from_official(kwargs: Mapping[str, Any]) -> Dict[str, Optional[dict]]:
    """``dict(backbone=Vim config, head=LinearClsHead config or None)`` computing ``VisionMamba(**kwargs)``.

    The backbone returns the official ``forward_features`` output (normalised class token, or the pooled tokens of
    a model without class token) from its last layer; the head is the official ``head`` (None for
    ``num_classes=0``).
    """
    ignored = sorted(set(kwargs) - set(VISION_MAMBA_DEFAULTS))
    if ignored:
        warnings.warn(f'VisionMamba ignores the unknown keyword(s) {ignored}, and so does Vim')
    options = {**VISION_MAMBA_DEFAULTS, **{k: v for k, v in kwargs.items() if k in VISION_MAMBA_DEFAULTS}}
    _check_refused(options)
    backbone = dict(
        type='Vim', arch=_mixer_arch(options), img_size=options['img_size'], patch_size=options['patch_size'],
        patch_stride=options['stride'], in_channels=options['channels'], out_indices=(-1, ),
        feature_source='residual', final_norm=True, with_pos_embed=options['if_abs_pos_embed'],
        rope=options['if_rope'], rope_residual=options['if_rope_residual'], rope_pt_grid=options['pt_hw_seq_len'],
        norm_type='rms' if options['rms_norm'] else 'ln', residual_in_fp32=options['residual_in_fp32'],
        bimamba_type='v1' if options['if_bimamba'] else options['bimamba_type'],
        divide_out=options['if_divide_out'], layer_scale=options['init_layer_scale'],
        drop_rate=options['drop_rate'], drop_path_rate=options['drop_path_rate'],
        norm_eps=options['norm_epsilon'], **_readout(options))
    num_classes = options['num_classes']
    head = None if num_classes == 0 else dict(type='LinearClsHead', num_classes=num_classes,
                                              in_channels=options['embed_dim'])
    return dict(backbone=backbone, head=head)
