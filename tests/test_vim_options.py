"""Official Vim options: what Vim refuses (by name, with the supported values), and the released model families.

The parity of every supported option is checked against the official code in test_vim.py (fixtures in
tests/data/vim_official/); here: refusals, ignored keywords, dtype handling and checkpoint layouts at full size.
"""
import warnings

import pytest
import torch

from mmseg_vil.models.backbones.vim import Vim, convert_official_vim
from mmseg_vil.models.backbones.vim_options import vim_config_from_official

TINY = dict(embed_dims=16, num_layers=2)


@pytest.mark.parametrize('kwargs,message', [
    (dict(if_bidirectional=True), r'if_bidirectional=True is not supported; supported: False'),
    (dict(initializer_cfg=dict(initializer_range=0.01)), r"initializer_cfg=\{'initializer_range': 0.01\} is not "
                                                         r'supported; supported: None'),
    (dict(dtype=torch.float16), r'dtype=torch.float16 is not supported; supported: None'),
    (dict(flip_img_sequences_ratio=0.5), r'flip_img_sequences_ratio=0.5 is not supported; supported: a value <= 0'),
    (dict(patch_size=(16, 16)), r'patch_size=\(16, 16\) is not supported; supported: an int'),
    (dict(bimamba_type='v3'), r"bimamba_type='v3' is not supported; supported: v2, v1, none"),
    (dict(if_cls_token=False, final_pool_type='max'), r"final_pool_type='max' is not supported; supported: "
                                                      r"\['mean', 'none'\] without a class token"),
    (dict(if_cls_token=False, final_pool_type='all'), r"final_pool_type='all' is not supported"),
    (dict(ssm_cfg=dict(conv_bias=False)), r"ssm_cfg\['conv_bias'\]=False is not supported; supported: the keys "
                                          r'd_conv, expand, dt_rank, use_fast_path'),
    (dict(if_rope=True, use_double_cls_token=True), r'use_double_cls_token=True is not supported; supported: False '
                                                    r'with if_rope=True'),
])
def test_unsupported_official_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vim_config_from_official(kwargs)


def test_unknown_keywords_are_ignored_like_the_official_class():
    """The released Vim-B entry passes the misspelt if_devide_out, which VisionMamba swallows in **kwargs."""
    with pytest.warns(UserWarning, match=r"ignores the unknown keyword\(s\) \['if_devide_out'\]"):
        config = vim_config_from_official(dict(if_devide_out=False))
    assert config['backbone']['divide_out'] is True


@pytest.mark.parametrize('kwargs,message', [
    (dict(cls_position='tail'), r"cls_position='tail' is not supported; choose one of \('middle', 'head', "
                                r"'double'\)"),
    (dict(norm_type='batch'), r"norm_type='batch' is not supported; choose one of \('rms', 'ln'\)"),
    (dict(bimamba_type='v3'), r"bimamba_type='v3' is not supported; choose one of \('v2', 'v1', 'none'\)"),
    (dict(out_type='mean_pooled'), r"out_type='mean_pooled' pools a sequence without class tokens"),
    (dict(rope=True, cls_position='double'), r"rope=True with cls_position='double' is not supported"),
    (dict(arch=dict(embed_dims=18, num_layers=2), rope=True), 'rope=True needs embed_dims divisible by 4, got 18'),
    (dict(patch_stride=32), r'patch_stride=32 must lie in \[1, patch_size=16\]'),
    (dict(arch=dict(TINY, d_inner=8)), r"unknown keys \['d_inner'\]; known: embed_dims, num_layers, d_state"),
])
def test_unsupported_backbone_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Vim(**{'arch': TINY, 'out_indices': -1, **kwargs})


@pytest.mark.parametrize('residual_in_fp32,dtype', [(True, torch.float32), (False, torch.bfloat16)])
def test_residual_stream_dtype(residual_in_fp32, dtype):
    """A bfloat16 model keeps its residual stream in float32 only with residual_in_fp32 (the fixtures run float32,
    where both settings compute the same)."""
    model = Vim(TINY, out_indices=-1, out_type='raw', feature_source='residual', residual_in_fp32=residual_in_fp32,
                scan_chunk_size=8).to(torch.bfloat16).eval()
    with torch.no_grad():
        residual = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))[0]
    assert residual.dtype == dtype


# Released registry entries (vim_spec.md §1 in tests/data/spec_excerpts.md; "+": patch 16, stride 8) and their
# parameter counts with the head.
FAMILIES = {
    'vim-tiny': (dict(embed_dim=192), 7_148_008),
    'vim-small': (dict(embed_dim=384), 25_796_584),
    'vim-base': (dict(embed_dim=768, d_state=16, if_devide_out=True), 97_598_440),
    'vim-tiny+': (dict(embed_dim=192, stride=8), None),
    'vim-small+': (dict(embed_dim=384, stride=8), None),
}
RELEASED_FLAGS = dict(patch_size=16, depth=24, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                      final_pool_type='mean', if_abs_pos_embed=True, if_rope=False, if_rope_residual=False,
                      bimamba_type='v2', if_cls_token=True, if_divide_out=True, use_middle_cls_token=True)


def official_shapes(dim: int, num_patches: int, depth: int = 24) -> dict:
    """Key names and shapes of an official Vim checkpoint (vim_spec.md §5, tests/data/spec_excerpts.md)."""
    inner, rank = 2 * dim, -(-dim // 16)
    branch = {'conv1d.weight': (inner, 1, 4), 'conv1d.bias': (inner, ), 'x_proj.weight': (rank + 32, inner),
              'dt_proj.weight': (inner, rank), 'dt_proj.bias': (inner, )}
    mixer = {'A_log': (inner, 16), 'D': (inner, ), 'A_b_log': (inner, 16), 'D_b': (inner, ),
             'in_proj.weight': (2 * inner, dim), 'out_proj.weight': (dim, inner), **branch,
             **{k.replace('.', '_b.', 1): v for k, v in branch.items()}}
    shapes = {'cls_token': (1, 1, dim), 'pos_embed': (1, num_patches + 1, dim), 'patch_embed.proj.weight':
              (dim, 3, 16, 16), 'patch_embed.proj.bias': (dim, ), 'head.weight': (1000, dim), 'head.bias': (1000, ),
              'norm_f.weight': (dim, )}
    for i in range(depth):
        shapes[f'layers.{i}.norm.weight'] = (dim, )
        shapes.update({f'layers.{i}.mixer.{k}': v for k, v in mixer.items()})
    return shapes


@pytest.mark.parametrize('family', list(FAMILIES))
def test_released_families_fit_the_translated_models(family):
    """Every released family converts to exactly the keys and shapes of the model its registry options give."""
    kwargs, num_params = FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Vim-B's misspelt if_devide_out (test_unknown_keywords_are_ignored...)
        config = vim_config_from_official({**RELEASED_FLAGS, **kwargs})
    side = (224 - 16) // kwargs.get('stride', 16) + 1
    with torch.device('meta'):
        model = Vim(**{k: v for k, v in config['backbone'].items() if k != 'type'})
        official = {k: torch.empty(shape) for k, shape in official_shapes(kwargs['embed_dim'], side * side).items()}
    assert model.grid_size == (side, side)
    assert {k: tuple(v.shape) for k, v in convert_official_vim(official).items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert config['head'] == dict(type='LinearClsHead', num_classes=1000, in_channels=kwargs['embed_dim'])
    if num_params is not None:
        assert sum(v.numel() for v in official.values()) == num_params
