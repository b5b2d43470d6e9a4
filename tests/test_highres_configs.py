"""The high-resolution configs, where ViL's cost linear in the tokens matters: UperNet on Cityscapes at 1024x1024
crops and on ADE20K at 640x640, for ViL-T/S and their DeiT-T/S baselines.

Their recipes are checked against MMSegmentation 1.2.2's Cityscapes and 640x640 ADE20K conventions and against the
512x512 ADE20K configs they extend; each ViL config and its DeiT twin differ only in the backbone. Every config trains
for two iterations on a generated dataset of its layout, with its own pipeline, heads and optimizer but a narrow
backbone (full depth, so the configured output blocks exist) and 64x64 crops; the ViL-T ones are then evaluated with
their configured full-resolution sliding windows.
"""
import math
import os.path as osp
import re
from typing import Dict, List, Tuple

import pytest
from e2e_helpers import ROOT, DATA_LOADERS, make_ade20k
from mmengine.config import Config

from mmseg_vil import model_zoo
from mmseg_vil.datasets import generate_cityscapes
from mmseg_vil.engine import load_config, run_train

CITYSCAPES = '4xb2-80k_cityscapes-1024x1024'
ADE20K_640 = '1xb16-160k_ade20k-640x640'
ADE20K_512 = '1xb16-160k_ade20k-512x512'
BACKBONES = {'vil': 'vil', 'deit': 'vit'}  # model name -> config folder


def config_path(model: str, size: str, recipe: str) -> str:
    return osp.join(ROOT, 'configs', BACKBONES[model], f'upernet_{model}-{size}16_{recipe}.py')


HIGHRES = [(model, size, recipe) for recipe in (CITYSCAPES, ADE20K_640) for model in BACKBONES for size in 'ts']


def highres_id(case: Tuple[str, str, str]) -> str:
    return osp.basename(config_path(*case))[:-3]


def flatten(value, prefix: str = '') -> Dict[str, object]:
    """Every leaf of a nested config as ``{'a.b.0.c': value}`` (lists and tuples indexed)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    return {k: v for key, item in items for k, v in flatten(item, f'{prefix}.{key}' if prefix else str(key)).items()}


MISSING = object()


def differing_keys(a: Config, b: Config) -> List[str]:
    """The flattened keys (see :func:`flatten`) whose values differ or that only one config has."""
    flat_a, flat_b = flatten(a.to_dict()), flatten(b.to_dict())
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k, MISSING) != flat_b.get(k, MISSING))


@pytest.mark.parametrize('recipe', [CITYSCAPES, ADE20K_640])
@pytest.mark.parametrize('size', 'ts')
def test_vil_and_deit_twins_differ_only_in_the_backbone(size, recipe):
    vil = Config.fromfile(config_path('vil', size, recipe))
    deit = Config.fromfile(config_path('deit', size, recipe))
    differing = differing_keys(vil, deit)
    assert 'checkpoint' in differing and 'model.backbone.type' in differing
    assert all(key == 'checkpoint' or key.startswith('model.backbone.') for key in differing), differing
    assert vil.model.backbone.type == 'ViL' and deit.model.backbone.type == 'VisionTransformer'


@pytest.mark.parametrize('case', HIGHRES, ids=highres_id)
def test_backbone_and_optimizer_are_the_ade20k_512_configs(case):
    """The high-resolution config keeps its 512x512 twin's backbone (but for the build size), checkpoint, width and
    optimizer: only data, schedule length and sizes change."""
    model, size, recipe = case
    config, ade512 = Config.fromfile(config_path(*case)), Config.fromfile(config_path(model, size, ADE20K_512))
    crop = config.crop_size[0]
    backbone, reference = config.model.backbone.to_dict(), ade512.model.backbone.to_dict()
    assert backbone.pop('img_size') in (crop, (crop, crop)) and reference.pop('img_size') in (512, (512, 512))
    assert backbone == reference and config.checkpoint == ade512.checkpoint
    assert config.optim_wrapper == ade512.optim_wrapper
    for key in ('neck', 'decode_head', 'auxiliary_head'):
        assert differing_keys(Config(config.model[key]), Config(ade512.model[key])) == (
            ['num_classes'] if recipe == CITYSCAPES and key != 'neck' else [])


@pytest.mark.parametrize('case', HIGHRES, ids=highres_id)
def test_name_states_the_recipe(case):
    """``<GPUs>xb<batch per GPU>-<iterations>k_<dataset>-<crop>``: batch, length and crop as the config sets them."""
    cfg = Config.fromfile(config_path(*case))
    batch, kilo_iters, height, width = map(int, re.fullmatch(r'\dxb(\d+)-(\d+)k_\w+-(\d+)x(\d+)', case[2]).groups())
    assert cfg.train_dataloader.batch_size == batch
    assert cfg.train_cfg.max_iters == cfg.param_scheduler[-1].end == kilo_iters * 1000
    assert tuple(cfg.crop_size) == (height, width) == tuple(cfg.model.data_preprocessor.size)
    assert tuple(cfg.train_dataloader.dataset.pipeline[3].crop_size) == (height, width)
    assert tuple(cfg.model.test_cfg.crop_size) == (height, width)


@pytest.mark.parametrize('case', HIGHRES, ids=highres_id)
def test_model_index_finds_it_by_name(case):
    """In the metafile with its total batch and dataset, and without results: no paper reports these settings."""
    name = highres_id(case)
    config, weights = model_zoo.find_segmentation_model(name)
    assert config.filename == config_path(*case) and weights is None
    entry = model_zoo.metafile_entries()[name]
    gpus, batch = map(int, re.match(r'(\d)xb(\d+)', case[2]).groups())
    assert entry['Metadata']['Batch Size'] == gpus * batch == {CITYSCAPES: 8, ADE20K_640: 16}[case[2]]
    assert entry['Metadata']['Training Data'] == {CITYSCAPES: 'Cityscapes', ADE20K_640: 'ADE20K'}[case[2]]
    assert 'Results' not in entry


@pytest.mark.parametrize('size', 'ts')
def test_cityscapes_recipe_is_mmsegmentation_s(size):
    """MMSegmentation 1.2.2: _base_/datasets/cityscapes{,_1024x1024}.py, schedule_80k.py's length and intervals,
    SegFormer's 1024x1024 Cityscapes test windows; the optimizer is the ViL recipe's (checked above)."""
    cfg = Config.fromfile(config_path('vil', size, CITYSCAPES))
    train, val = cfg.train_dataloader, cfg.val_dataloader
    assert train.dataset.type == val.dataset.type == 'CityscapesDataset'
    assert train.dataset.data_root == 'data/cityscapes/'
    assert train.dataset.data_prefix == dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train')
    assert val.dataset.data_prefix == dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val')
    assert cfg.test_dataloader == val
    load, annotations, resize, crop, flip, photometric, pack = train.dataset.pipeline
    assert [t.type for t in (load, flip, photometric, pack)] == [
        'LoadImageFromFile', 'RandomFlip', 'PhotoMetricDistortion', 'PackSegInputs']
    assert annotations == dict(type='LoadAnnotations')  # train ids as stored: no reduce_zero_label
    assert resize == dict(type='RandomResize', scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True)
    assert crop == dict(type='RandomCrop', crop_size=(1024, 1024), cat_max_ratio=0.75)
    assert val.dataset.pipeline[1] == dict(type='Resize', scale=(2048, 1024), keep_ratio=True)
    assert train.batch_size == 2 and train.sampler.type == 'InfiniteSampler'
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 19
    assert cfg.model.test_cfg == dict(mode='slide', crop_size=(1024, 1024), stride=(768, 768))
    assert cfg.model.backbone.img_size == 1024
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end) == ('LinearLR', 0, 1500)
    assert (cosine.type, cosine.begin, cosine.end) == ('CosineAnnealingLR', 1500, 80000)
    assert cosine.eta_min_ratio * cfg.optim_wrapper.optimizer.lr == pytest.approx(1e-6)
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=8000)
    assert cfg.default_hooks.checkpoint.interval == 8000


@pytest.mark.parametrize('model', BACKBONES)
@pytest.mark.parametrize('size', 'ts')
def test_ade20k_640_differs_from_512_only_in_scale(model, size):
    """MMSegmentation 1.2.2's ade20k_640x640.py: scale (2560, 640) in training and test, 640 crops; windows of 640
    with stride 426 (its 640x640 BEiT and ConvNeXt UperNets); everything else is the 512x512 config's."""
    cfg = Config.fromfile(config_path(model, size, ADE20K_640))
    differing = differing_keys(cfg, Config.fromfile(config_path(model, size, ADE20K_512)))
    scale_keys = ['model.backbone.img_size', 'model.data_preprocessor.size', 'model.test_cfg.crop_size',
                  'model.test_cfg.stride', 'crop_size', 'train_pipeline.2.scale', 'train_pipeline.3.crop_size',
                  'test_pipeline.1.scale'] + [f'{loader}.dataset.pipeline.{i}' for loader, i in (
                      ('train_dataloader', '2.scale'), ('train_dataloader', '3.crop_size'),
                      ('val_dataloader', '1.scale'), ('test_dataloader', '1.scale'))]
    assert differing == sorted(scale_keys)
    assert cfg.train_pipeline[2].scale == cfg.test_pipeline[1].scale == (2560, 640)
    assert cfg.model.test_cfg == dict(mode='slide', crop_size=(640, 640), stride=(426, 426))
    assert cfg.train_pipeline[1] == dict(type='LoadAnnotations', reduce_zero_label=True)


@pytest.fixture(scope='module')
def data_roots(tmp_path_factory) -> Dict[str, str]:
    """Tiny datasets of both layouts: Cityscapes frames at 1:2 (64x128), ADE20K images 64x64."""
    cityscapes = str(tmp_path_factory.mktemp('cityscapes'))
    generate_cityscapes(cityscapes, num_train=2, num_val=1, size=(64, 128))
    return {CITYSCAPES: cityscapes, ADE20K_640: make_ade20k(str(tmp_path_factory.mktemp('ade') / 'ADE'))}


WIDTH = 32
CROP = (64, 64)


def tiny_options(model: str, data_root: str) -> dict:
    """The config as shipped but narrow (width 32, full depth), 64x64 crops from a small resize, 2 iterations."""
    options = {f'{loader}.dataset.data_root': data_root for loader in DATA_LOADERS}
    for loader in ('train_dataloader', 'val_dataloader'):
        options.update({f'{loader}.num_workers': 0, f'{loader}.persistent_workers': False})
    options.update({
        'model.backbone.init_cfg': None,  # no ImageNet checkpoint here
        'model.data_preprocessor.size': CROP,
        'train_dataloader.dataset.pipeline.2.scale': (128, 64),  # the images are small: do not blow them up first
        'train_dataloader.dataset.pipeline.3.crop_size': CROP,
        'model.neck.embed_dim': WIDTH,
        'model.decode_head.in_channels': [WIDTH] * 4,
        'model.decode_head.channels': 16,
        'model.auxiliary_head.in_channels': WIDTH,
        'model.auxiliary_head.channels': 16,
        'train_cfg.max_iters': 2,
        'train_cfg.val_begin': 3,  # evaluated below, at full resolution, for the ViL-T configs only
        'default_hooks.checkpoint.save_last': False,
    })
    if model == 'vil':
        options['model.backbone.arch'] = dict(_delete_=True, embed_dims=WIDTH, num_layers=24)
    else:
        options.update({'model.backbone.embed_dims': WIDTH, 'model.backbone.num_heads': 2})
    return options


@pytest.mark.parametrize('case', HIGHRES, ids=highres_id)
def test_config_trains_on_generated_data(case, data_roots, tmp_path):
    model, size, recipe = case
    cfg = load_config(config_path(*case), str(tmp_path), tiny_options(model, data_roots[recipe]))
    runner = run_train(cfg)
    assert runner.iter == 2
    assert math.isfinite(runner.message_hub.get_scalar('train/loss').current())
    segmentor = runner.model
    num_classes = 19 if recipe == CITYSCAPES else 150
    assert segmentor.decode_head.conv_seg.out_channels == segmentor.auxiliary_head.conv_seg.out_channels == num_classes
    grid = cfg.crop_size[0] // 16  # the embedding is built for the configured size and resampled to 64x64 crops
    backbone = segmentor.backbone
    if model == 'vil':
        assert len(backbone.layers) == 24 and tuple(backbone.pos_embed.shape) == (1, grid, grid, WIDTH)
    else:
        assert len(backbone.layers) == 12 and tuple(backbone.pos_embed.shape) == (1, grid * grid + 1, WIDTH)
    # the recipe's layer-wise lr decay reached the narrow model: the embeddings sit 13 layers below the heads
    assert min(g['lr_scale'] for g in runner.optim_wrapper.optimizer.param_groups) == pytest.approx(0.65**13)

    if size == 't' and model == 'vil':
        check_full_resolution_evaluation(runner, recipe)


def check_full_resolution_evaluation(runner, recipe: str) -> None:
    """The configured test pipeline and sliding windows: a Cityscapes frame is evaluated at 1024x2048 in three
    1024x1024 windows (stride 768), an ADE20K image with its short side at 640 in one 640x640 window; predictions come
    back at the label's size."""
    windows = []
    hook = runner.model.backbone.register_forward_pre_hook(lambda _, args: windows.append(tuple(args[0].shape)))
    try:
        runner.model.eval()
        batch = next(iter(runner.val_dataloader))  # one image
        (sample,) = runner.model.val_step(batch)
    finally:
        hook.remove()
    assert windows == ([(1, 3, 1024, 1024)] * 3 if recipe == CITYSCAPES else [(1, 3, 640, 640)])
    prediction = sample.pred_sem_seg.data
    assert tuple(prediction.shape[1:]) == tuple(sample.gt_sem_seg.data.shape[1:]) == sample.ori_shape
    assert int(prediction.max()) < runner.model.decode_head.num_classes
    evaluator = runner.val_loop.evaluator  # the config's IoUMetric, over the dataset's classes
    evaluator.process([sample], batch)
    metrics = evaluator.evaluate(1)
    assert set(metrics) >= {'aAcc', 'mIoU', 'mAcc'} and 0.0 <= metrics['mIoU'] <= 100.0
