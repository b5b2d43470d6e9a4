"""Every config under configs/ (present and future) builds: model, optimizer and data pipelines.

Models are built in the registries of the config's own ``default_scope`` (MMSegmentation for segmentation,
MMPretrain for classification), with pretrained weights disabled. Full-size models are built, not run; that the
segmentors' backbone, neck and heads fit together is checked from their layer widths.
"""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, TRANSFORMS, DefaultScope
from vil_official import official_layer_decay_scale

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def is_partial(path: str) -> bool:
    """Bases are not complete configs: files under a ``_base_`` folder or named ``_*.py``."""
    return '_base_' in path.split(osp.sep) or osp.basename(path).startswith('_')


CONFIGS = sorted(
    path for path in (osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True))
    if not is_partial(path))


def without_pretrained(model_cfg: dict) -> None:
    """Drop checkpoint loading from a model config in place (backbone init_cfg, legacy ``pretrained``)."""
    model_cfg.pop('pretrained', None)
    backbone = model_cfg.get('backbone', {})
    if backbone.get('init_cfg', {}).get('type') == 'Pretrained':
        backbone.init_cfg = None


def cpu_optim_wrapper(optim_cfg: dict) -> dict:
    """The optimizer config with AmpOptimWrapper, which refuses to build without a GPU, as a plain OptimWrapper."""
    optim_cfg = optim_cfg.copy()
    if optim_cfg.get('type') == 'AmpOptimWrapper' and not torch.cuda.is_available():
        optim_cfg.type = 'OptimWrapper'
        for amp_only in ('loss_scale', 'dtype', 'use_fsdp'):
            optim_cfg.pop(amp_only, None)
    return optim_cfg


def test_configs_found():
    families = {path.split(osp.sep)[1] for path in CONFIGS}
    assert {'vil', 'vit', 'vim'} <= families
    assert len([p for p in CONFIGS if p.startswith(osp.join('configs', 'vil'))]) == 7  # 3 + 4 high-resolution


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds(path):
    cfg = Config.fromfile(osp.join(ROOT, path))
    scope = cfg.get('default_scope', 'mmseg')
    without_pretrained(cfg.model)
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
        optimizer = build_optim_wrapper(model, cpu_optim_wrapper(cfg.optim_wrapper)).optimizer
        for loader in ('train_dataloader', 'val_dataloader'):
            for transform in cfg[loader].dataset.pipeline:
                assert callable(TRANSFORMS.build(transform)), transform
    if scope == 'mmseg':
        check_segmentor_widths(model)
        if path.startswith(osp.join('configs', 'vil')):  # the official recipe (the demo trains differently)
            check_official_vil_layer_decay(model, optimizer)


def check_official_vil_layer_decay(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter's lr is the official recipe's: 5e-4 x 0.65^(layers above it), a block pair being one layer
    (tests/data/spec_excerpts.md, §7); the expected scale is derived from the parameter's name alone."""
    lr = {id(param): group['lr'] for group in optimizer.param_groups for param in group['params']}
    for name, param in model.named_parameters():
        assert lr[id(param)] == pytest.approx(5e-4 * official_layer_decay_scale(name, 0.65), rel=1e-9), name


def check_segmentor_widths(model: torch.nn.Module) -> None:
    """Backbone width D (its patch embedding's channels) = what the neck and heads were built for."""
    width = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)).out_channels
    assert len(model.backbone.out_indices) == len(model.neck.rescales) == 4
    neck_inputs = {m.in_channels for m in model.neck.modules() if isinstance(m, torch.nn.ConvTranspose2d)}
    assert neck_inputs == {width}
    assert model.decode_head.in_channels == [width] * 4
    assert model.auxiliary_head.in_channels == width


@pytest.mark.parametrize('path', [p for p in CONFIGS if p.startswith(osp.join('configs', 'vil')) and
                                  p.endswith('_ade20k-512x512.py')])  # the others: test_highres_configs.py
def test_vil_configs_follow_official_recipe(path):
    """The official recipe (tests/data/spec_excerpts.md, vil_spec §7) as the configs resolve it."""
    cfg = Config.fromfile(osp.join(ROOT, path))
    size = osp.basename(path).split('_')[1]  # vil-t16 / vil-s16 / vil-b16
    backbone = cfg.model.backbone
    assert backbone.type == 'ViL' and backbone.img_size == 512 and backbone.init_cfg.type == 'Pretrained'
    assert tuple(backbone.out_indices) == (7, 11, 15, 23)
    assert backbone.drop_path_rate == {'vil-t16': 0.0, 'vil-s16': 0.05, 'vil-b16': 0.1}[size]
    width = {'vil-t16': 192, 'vil-s16': 384, 'vil-b16': 768}[size]
    assert cfg.model.neck.type == 'Feature2Pyramid' and cfg.model.neck.rescales == [4, 2, 1, 0.5]
    assert cfg.model.decode_head.in_channels == [width] * 4
    assert cfg.model.decode_head.channels == {'vil-t16': 192, 'vil-s16': 384, 'vil-b16': 384}[size]
    assert cfg.model.decode_head.pool_scales == (1, 2, 3, 6)
    aux = cfg.model.auxiliary_head
    assert aux.in_index == 2 and aux.loss_decode.loss_weight == 0.4
    assert cfg.model.test_cfg == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW' and optim.optimizer.lr == 5e-4 and optim.optimizer.weight_decay == 0.05
    assert optim.constructor == 'LayerDecayOptimWrapperConstructor'
    assert optim.paramwise_cfg.layer_decay_rate == 0.65
    warmup, cosine = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 1500
    assert cosine.type == 'CosineAnnealingLR' and cosine.begin == 1500 and cosine.end == 160000
    assert cosine.eta_min_ratio * optim.optimizer.lr == pytest.approx(1e-6)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 16
    assert cfg.default_hooks.checkpoint.interval == 16000 and cfg.default_hooks.checkpoint.save_last
    assert cfg.custom_imports.imports == ['mmseg_vil'] and cfg.default_scope == 'mmseg'


def test_baselines_differ_from_vil_only_in_the_backbone_and_layer_decay():
    def flat(path):
        cfg = Config.fromfile(osp.join(ROOT, path)).to_dict()
        cfg.pop('checkpoint')
        cfg['model'].pop('backbone')
        cfg['optim_wrapper']['paramwise_cfg'].pop('layer_decay_rate')
        return cfg

    for size in 'ts':
        vil = flat(f'configs/vil/upernet_vil-{size}16_1xb16-160k_ade20k-512x512.py')
        assert flat(f'configs/vit/upernet_deit-{size}16_1xb16-160k_ade20k-512x512.py') == vil
        assert flat(f'configs/vim/upernet_vim-{size}16_1xb16-160k_ade20k-512x512.py') == vil
    assert flat('configs/vit/upernet_deit-b16_1xb16-160k_ade20k-512x512.py') == flat(
        'configs/vil/upernet_vil-b16_1xb16-160k_ade20k-512x512.py')
