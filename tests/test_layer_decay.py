"""LayerDecayOptimWrapperConstructor: layer ids, lr scales and weight decay of every parameter group.

The segmentors are the configs' UperNet with tiny backbones, the optimizer settings those of the shipped 160k
schedule, so the tests check what the configs will do.
"""
import copy
import logging
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

from mmseg_vil.engine.optimizers.layer_decay import LayerDecayOptimWrapperConstructor, log_layer_groups
from vil_official import official_layer_decay_scale

CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs')
SCHEDULE = Config.fromfile(osp.join(CONFIGS, '_base_/schedules/schedule_160k.py'))
BASE_LR = SCHEDULE.optim_wrapper.optimizer.lr
BASE_WD = SCHEDULE.optim_wrapper.optimizer.weight_decay
RATE = SCHEDULE.optim_wrapper.paramwise_cfg.layer_decay_rate
NO_DECAY_TOKENS = ('pos_embed', 'cls_token', 'cls_pos_embed')


def build_segmentor(backbone: dict, width: int) -> torch.nn.Module:
    """The configs' isotropic UperNet around ``backbone`` with feature width ``width``, plain BN, on CPU."""
    cfg = Config.fromfile(osp.join(CONFIGS, '_base_/models/upernet_isotropic.py'))
    model = copy.deepcopy(cfg.model)
    model.backbone = backbone
    model.neck.update(embed_dim=width, norm_cfg=dict(type='BN'))
    model.decode_head.update(in_channels=[width] * 4, channels=8, norm_cfg=dict(type='BN'))
    model.auxiliary_head.update(in_channels=width, channels=8, norm_cfg=dict(type='BN'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(model)


def param_groups(model: torch.nn.Module, rate: float = RATE) -> dict:
    """Build the schedule's optimizer for ``model``; return its groups keyed by parameter name."""
    optim_cfg = copy.deepcopy(SCHEDULE.optim_wrapper)
    optim_cfg.paramwise_cfg.layer_decay_rate = rate
    with DefaultScope.overwrite_default_scope('mmseg'):
        optimizer = build_optim_wrapper(model, optim_cfg).optimizer
    groups = {group['param_name']: group for group in optimizer.param_groups}
    named = dict(model.named_parameters())
    assert sorted(groups) == sorted(named), 'every trainable parameter must be in exactly one group'
    for name, group in groups.items():
        assert group['params'] == [named[name]]
    return groups


def expected_weight_decay(name: str, param: torch.Tensor) -> float:
    """The schedule's rule: no decay for 1-D parameters (norms, biases, gates' scales) and tokens/embeddings."""
    return 0.0 if param.ndim == 1 or name.split('.')[-1] in NO_DECAY_TOKENS else BASE_WD


def check_groups(groups: dict, model: torch.nn.Module, expected_scale) -> None:
    for name, param in model.named_parameters():
        group = groups[name]
        scale = expected_scale(name)
        assert group['lr_scale'] == pytest.approx(scale, rel=1e-12), name
        assert group['lr'] == pytest.approx(BASE_LR * scale, rel=1e-12), name
        assert group['weight_decay'] == expected_weight_decay(name, param), name


def test_vil_official_pair_grouping():
    """Official ViL: embeddings 0.65^13, block pair j (blocks 2j, 2j+1) 0.65^(12-j), neck and heads the full lr
    (tests/data/spec_excerpts.md, vil_spec §7)."""
    model = build_segmentor(
        dict(type='ViL', arch=dict(embed_dims=16, num_layers=24), img_size=32, out_indices=(7, 11, 15, 23)), 16)
    groups = param_groups(model)
    check_groups(groups, model, lambda name: official_layer_decay_scale(name, RATE))
    assert RATE == 0.65
    assert groups['backbone.layers.0.mixer.proj_up.weight']['lr_scale'] == pytest.approx(0.65**12)
    assert groups['backbone.layers.23.mixer.proj_up.weight']['lr_scale'] == pytest.approx(0.65)
    assert groups['backbone.pos_embed']['weight_decay'] == 0.0  # listed by ViL.no_weight_decay()
    assert groups['backbone.layers.3.mixer.q_proj.weight']['weight_decay'] == BASE_WD  # 3-D block-diagonal weight
    assert {g['layer_id'] for g in groups.values()} == set(range(14))


def test_vim_per_layer_depth_and_tokens():
    """Vim: stem (patch/position embeddings, class token) 0, layer i is i + 1, heads on top."""
    num_layers, rate = 4, 0.65**0.5
    model = build_segmentor(
        dict(type='Vim', arch=dict(embed_dims=16, num_layers=num_layers), img_size=32, out_indices=(0, 1, 2, 3),
             with_cls_token=True), 16)
    groups = param_groups(model, rate)
    top = num_layers + 1

    def scale(name: str) -> float:
        if name.startswith(('backbone.patch_embed', 'backbone.pos_embed', 'backbone.cls_')):
            return rate**top
        if name.startswith('backbone.layers.'):
            return rate**(top - 1 - int(name.split('.')[2]))
        return 1.0

    expected = {name: scale(name) for name, _ in model.named_parameters()}
    for name, group in groups.items():
        assert group['lr'] == pytest.approx(BASE_LR * expected[name], rel=1e-12), name
    assert groups['backbone.cls_token']['weight_decay'] == 0.0
    assert groups['backbone.cls_pos_embed']['weight_decay'] == 0.0


def test_mmseg_vision_transformer_depth_from_names():
    """MMSegmentation's ViT has no get_layer_depth: depth comes from names (tokens/patch 0, layers.i i+1, rest top)."""
    model = build_segmentor(
        dict(type='VisionTransformer', img_size=32, embed_dims=16, num_layers=4, num_heads=2,
             out_indices=(0, 1, 2, 3), final_norm=True), 16)
    assert not hasattr(model.backbone, 'get_layer_depth')
    groups = param_groups(model)

    def scale(name: str) -> float:
        if name.startswith(('backbone.cls_token', 'backbone.pos_embed', 'backbone.patch_embed')):
            return RATE**5
        if name.startswith('backbone.layers.'):
            return RATE**(4 - int(name.split('.')[2]))
        return 1.0  # final norm ln1, neck, heads

    check_groups(groups, model, scale)
    # Tokens get no weight decay through the schedule's custom_keys; MMSeg's ViT lists none itself.
    assert groups['backbone.cls_token']['weight_decay'] == 0.0
    assert groups['backbone.layers.0.attn.attn.in_proj_weight']['weight_decay'] == BASE_WD
    assert groups['backbone.ln1.weight']['layer_id'] == 5


def test_backbone_without_depth_information_is_refused():
    model = build_segmentor(dict(type='ResNetV1c', depth=18, out_indices=(0, 1, 2, 3)), 16)
    with pytest.raises(NotImplementedError, match='get_layer_depth'):
        param_groups(model)


def test_registered_for_mmpretrain_classifiers():
    """In MMPretrain's registry too; an ImageClassifier's own get_layer_depth puts the head on top."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    from mmpretrain.registry import OPTIM_WRAPPER_CONSTRUCTORS as PRETRAIN_CONSTRUCTORS

    assert OPTIM_WRAPPER_CONSTRUCTORS.get('LayerDecayOptimWrapperConstructor') is LayerDecayOptimWrapperConstructor
    assert PRETRAIN_CONSTRUCTORS.get('LayerDecayOptimWrapperConstructor') is LayerDecayOptimWrapperConstructor
    with DefaultScope.overwrite_default_scope('mmpretrain'):  # the registry follows the current default scope
        model = PRETRAIN_MODELS.build(
            dict(type='ImageClassifier',
                 backbone=dict(type='ViL', arch=dict(embed_dims=16, num_layers=4), img_size=32, out_indices=(3, ),
                               out_type='pooled', final_norm=True),
                 head=dict(type='LinearClsHead', num_classes=5, in_channels=32)))
    constructor = LayerDecayOptimWrapperConstructor(
        dict(optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.1)), dict(layer_decay_rate=0.5))
    params = []
    constructor.add_params(params, model)
    scales = {group['param_name']: group['lr_scale'] for group in params}
    assert scales['backbone.patch_embed.weight'] == 0.5**3  # 2 pairs: embeddings 0, pairs 1-2, top 3
    assert scales['backbone.layers.1.norm.weight'] == 0.5**2
    assert scales['backbone.layers.2.norm.weight'] == 0.5
    assert scales['head.fc.weight'] == scales['backbone.norm.weight'] == 1.0


def test_summary_lists_every_layer():
    model = build_segmentor(
        dict(type='ViL', arch=dict(embed_dims=16, num_layers=4), img_size=32, out_indices=(0, 1, 2, 3)), 16)
    groups = list(param_groups(model).values())
    logger = MMLogger.get_instance('test_layer_decay_summary', log_level='INFO')
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    log_layer_groups(groups, logger)
    lines = records[-1].getMessage().splitlines()[1:]
    assert [line.split(':')[0].split()[-1] for line in lines] == ['0', '1', '2', '3']
    # Layer 0 holds patch_embed (weight decayed, bias not) and pos_embed (not decayed).
    assert lines[0].endswith('1 / 2') and f'x{RATE**3:.4g}' in lines[0]
