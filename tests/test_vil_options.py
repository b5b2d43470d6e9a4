"""Official ViL options: what ViL refuses (by name, with the supported values), and the released model families.

The parity of every supported option is checked against the official code in test_vil_parity.py (fixtures in
tests/data/vil_official/); here: refusals, warnings, presets and checkpoint layouts at full size.
"""
import pytest
import torch

from mmseg_vil.models.backbones.vil import ViL
from mmseg_vil.models.backbones.vil_checkpoint import convert_vil_state_dict, detect_vil_format, split_backbone_and_head
from mmseg_vil.models.backbones.vil_options import vil_config_from_official
from mmseg_vil.models.backbones.vim import Vim

TINY = dict(embed_dims=16, num_layers=2)


@pytest.mark.parametrize('cls,kwargs,message', [
    ('VisionLSTM2', dict(mode='segmentation'), r"mode='segmentation' is not supported; supported: \"classifier\", "
                                               r'"features"'),
    ('VisionLSTM2', dict(pooling=None), r"pooling=None is not supported; supported: \['bilateral_avg', "
                                        r"'bilateral_flatten'\] with mode=\"classifier\""),
    ('VisionLSTM2', dict(pooling='to_image'), r"pooling='to_image' is not supported; supported: \['bilateral_avg'"),
    ('VisionLSTM2', dict(conv_kind='3d'), r"conv_kind='3d' is not supported; supported: 2d, causal1d"),
    ('VisionLSTM2', dict(init_weights='xavier'), r"init_weights='xavier' is not supported; supported: original, "
                                                 r'original-fixed'),
    ('VisionLSTM2', dict(input_shape=(3, 224)), r'input_shape=\(3, 224\) is not supported; supported: \(channels, '
                                                r'height, width\)'),
    ('VisionLSTM2', dict(patch_size=(16, 8)), r'patch_size=\(16, 8\) is not supported; supported: an int or a pair '
                                              r'of equal ints'),
    ('VisionLSTM2', dict(stride=(8, 4)), r'stride=\(8, 4\) is not supported'),
    ('VisionLSTM2', dict(output_shape=None), r'output_shape=None is not supported; supported: \(num_classes,\)'),
    ('VisionLSTM2', dict(alternation='bidirectional'), r"VisionLSTM2 has no option\(s\) \['alternation'\]; its "
                                                       r"options are \['conv_kernel_size'"),
    ('VisionLSTM', dict(alternation='quaddirectional'), r"alternation='quaddirectional' is not supported; "
                                                        r'supported: "bidirectional"'),
    ('VisionLSTM', dict(pooling=None), r'pooling=None is not supported; supported: "bilateral_avg" with '
                                       r'mode="classifier"'),
    ('VisionLSTM', dict(mode=None, output_shape=None, pooling='bilateral_avg'),
     r"pooling='bilateral_avg' is not supported; supported: None with mode=None"),
    ('VisionLSTM', dict(mode='features'), r"mode='features' is not supported; supported: \"classifier\", None"),
    ('VisionLSTM', dict(conv_kind='2d'), r"VisionLSTM has no option\(s\) \['conv_kind'\]"),
])
def test_unsupported_official_options_are_refused_by_name(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vil_config_from_official(kwargs, cls)


def test_unknown_official_class_is_refused():
    with pytest.raises(ValueError, match=r"official_class='VisionTransformer' is not supported; choose one of "
                                         r"\('VisionLSTM2', 'VisionLSTM'\)"):
        vil_config_from_official({}, 'VisionTransformer')


def test_options_the_official_class_ignores_warn():
    with pytest.warns(UserWarning, match='ignores conv_kernel_size=5'):
        config = vil_config_from_official(dict(conv_kernel_size=5))
    assert config['backbone']['arch']['conv_kernel_size'] == 3
    with pytest.warns(UserWarning, match="ignores pooling='bilateral_avg' in mode=\"features\""):
        config = vil_config_from_official(dict(mode='features', pooling='bilateral_avg', output_shape=None))
    assert config['backbone']['out_type'] == 'raw' and config['head'] is None


@pytest.mark.parametrize('kwargs,message', [
    (dict(arch=dict(TINY, conv_kind='3d')), r"conv_kind='3d' is not supported; choose one of \('2d', 'causal1d'\)"),
    (dict(arch=dict(TINY, conv_kernel_size=4)), 'conv_kernel_size=4 must be odd'),
    (dict(arch=dict(TINY, kernel=3)), r"unknown keys \['kernel'\]; known: embed_dims, num_layers, num_heads"),
    (dict(init_scheme='xavier'), r"init_scheme='xavier' is not supported; choose one of \('original', "
                                 r"'original-fixed'\)"),
    (dict(drop_path_decay='layers'), r"drop_path_decay='layers' is not supported; choose one of \('none', "
                                     r"'blocks', 'pairs'\)"),
    (dict(patch_stride=32), r'patch_stride=32 must lie in \[1, patch_size=16\]'),
    (dict(out_type='pooled', out_norm=True), r"out_norm=True normalises 'featmap'/'raw' outputs, not "
                                             r"out_type='pooled'"),
    (dict(out_type='cls_token'), r"out_type='cls_token' is not supported; choose one of \('featmap', 'raw', "
                                 r"'pooled', 'avg_pooled'\)"),
])
def test_unsupported_backbone_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViL(**{'arch': TINY, 'out_indices': -1, **kwargs})


@pytest.mark.parametrize('decay,rates', [
    (False, [0.3] * 6), ('none', [0.3] * 6), (True, [0.0, 0.06, 0.12, 0.18, 0.24, 0.3]),
    ('blocks', [0.0, 0.06, 0.12, 0.18, 0.24, 0.3]), ('pairs', [0.0, 0.0, 0.15, 0.15, 0.3, 0.3])])
def test_drop_path_decay(decay, rates):
    model = ViL(arch=dict(embed_dims=16, num_layers=6), out_indices=-1, drop_path_rate=0.3, drop_path_decay=decay)
    assert [layer.drop_path.drop_prob for layer in model.layers] == pytest.approx(rates)


@pytest.mark.parametrize('backbone,pos_grid', [
    # ViL: the official embedding grid is the image in whole patches; Vim's is the patch grid, (32 - 8) / 4 + 1.
    (lambda: ViL(arch=TINY, img_size=32, patch_size=8, patch_stride=4, out_indices=-1, mlstm_backend='parallel'),
     (4, 4)),
    (lambda: Vim(TINY, img_size=32, patch_size=8, patch_stride=4, out_indices=-1, scan_chunk_size=8), (7, 7))])
def test_overlapping_patches_grid_and_padding(backbone, pos_grid):
    model = backbone().eval()
    assert model.pos_embed.shape[1:3] == pos_grid
    x = torch.randn(1, 3, 30, 34)  # padded to 32x36: (32 - 8) / 4 + 1 = 7 rows, 8 columns
    with torch.no_grad():
        out = model(x)[0]
        padded = model(torch.nn.functional.pad(x, (0, 2, 0, 2)))[0]
    assert out.shape == (1, 16, 7, 8)
    torch.testing.assert_close(out, padded)


# Released families (hubconf.py): (our arch, stride, official kwargs); parameter counts of vil_spec.md §4
# (tests/data/spec_excerpts.md).
FAMILIES = {
    'vil2-tiny': ('tiny', None, 'VisionLSTM2', dict(dim=192, depth=12), 6_391_528),
    'vil2-small': ('small', None, 'VisionLSTM2', dict(dim=384, depth=12), 23_398_696),
    'vil2-base': ('base', None, 'VisionLSTM2', dict(dim=768, depth=12), 89_263_528),
    'vil-tiny': ('v1-tiny', None, 'VisionLSTM', dict(dim=192, depth=24), 6_088_360),
    'vil-tinyplus': ('v1-tinyplus', None, 'VisionLSTM', dict(dim=192, depth=29), 7_277_840),
    'vil-small': ('v1-small', None, 'VisionLSTM', dict(dim=384, depth=24), 22_792_360),
    'vil-smallplus-stride8': ('v1-smallplus', 8, 'VisionLSTM', dict(dim=384, depth=26, stride=8), 24_628_664),
    'vil-base-stride8': ('v1-base', 8, 'VisionLSTM', dict(dim=768, depth=24, stride=8), 88_050_856),
}


def released_shapes(dim: int, num_blocks: int, v1: bool) -> dict:
    """Key names and shapes of a released ImageNet ``.th`` file (training-code names, vil_spec.md §5-6, §10;
    tests/data/spec_excerpts.md)."""
    inner, head_dim = 2 * dim, dim if v1 else 2 * dim
    block = {'xlstm_norm.weight': (dim, ), 'xlstm.learnable_skip': (inner, ), 'xlstm.proj_up.weight': (2 * inner, dim),
             'xlstm.mlstm_cell.igate.weight': (4, 3 * inner), 'xlstm.mlstm_cell.igate.bias': (4, ),
             'xlstm.mlstm_cell.fgate.weight': (4, 3 * inner), 'xlstm.mlstm_cell.fgate.bias': (4, ),
             'xlstm.mlstm_cell.outnorm.weight': (inner, ), 'xlstm.proj_down.weight': (dim, inner),
             **{f'xlstm.{p}_proj.weight': (inner // 4, 4, 4) for p in 'qkv'}}
    if v1:
        block.update({'xlstm.conv1d.conv.weight': (inner, 1, 4), 'xlstm.conv1d.conv.bias': (inner, )})
    else:
        block.update({'xlstm_norm.bias': (dim, ), 'xlstm.proj_up.bias': (2 * inner, ),
                      'xlstm.mlstm_cell.outnorm.bias': (inner, ), 'xlstm.proj_down.bias': (dim, ),
                      'xlstm.conv1d.weight': (inner, 1, 3, 3), 'xlstm.conv1d.bias': (inner, ),
                      **{f'xlstm.{p}_proj.bias': (inner, ) for p in 'qkv'}})
    shapes = {'patch_embed.proj.weight': (dim, 3, 16, 16), 'patch_embed.proj.bias': (dim, ),
              'pos_embed.embed': (1, 14, 14, dim), 'xlstm.post_blocks_norm.weight': (dim, ),
              'head.0.weight': (head_dim, ), 'head.0.bias': (head_dim, ), 'head.1.weight': (1000, head_dim),
              'head.1.bias': (1000, )}
    if not v1:
        shapes['xlstm.post_blocks_norm.bias'] = (dim, )
    for i in range(num_blocks):
        shapes.update({f'xlstm.blocks.{i}.{k}': v for k, v in block.items()})
    return shapes


@pytest.mark.parametrize('family', list(FAMILIES))
def test_released_families_fit_the_translated_models(family):
    """Every released checkpoint family converts to exactly the keys and shapes of the model its options give."""
    arch, stride, cls, kwargs, num_params = FAMILIES[family]
    v1 = cls == 'VisionLSTM'
    options = dict(kwargs, legacy_norm=True, **({} if v1 else dict(pooling='bilateral_flatten')))
    config = vil_config_from_official(options, cls)
    backbone_cfg = {k: v for k, v in config['backbone'].items() if k not in ('type', 'arch')}
    with torch.device('meta'):
        model = ViL(arch=arch, **backbone_cfg)
        released = {k: torch.empty(shape) for k, shape in released_shapes(**dict(
            dim=kwargs['dim'], num_blocks=kwargs['depth'] * (1 if v1 else 2), v1=v1)).items()}
    assert model.arch_settings == {**ViL.arch_defaults, **config['backbone']['arch']}
    assert model.patch_stride == (stride or 16)
    assert detect_vil_format(released) == ('released_v1' if v1 else 'released')
    backbone, head = split_backbone_and_head(convert_vil_state_dict(released))
    assert {k: tuple(v.shape) for k, v in backbone.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()}
    head_dim = config['head']['in_channels']
    assert {k: tuple(v.shape) for k, v in head.items()} == {
        'norm.weight': (head_dim, ), 'norm.bias': (head_dim, ), 'fc.weight': (1000, head_dim), 'fc.bias': (1000, )}
    assert sum(v.numel() for v in released.values()) == num_params
