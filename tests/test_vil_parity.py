"""Parity with the official VisionLSTM2: every case of every fixture file in tests/data/vil_official/.

The fixture's official state dict is written to disk and loaded through ``init_cfg=dict(type='Pretrained')``, the
code path users take. See tests/data/vil_official/README.md for what each case computed.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.backbones.vil import ViL
from mmseg_vil.models.backbones.vil_checkpoint import convert_vil_state_dict, split_backbone_and_head

FIXTURE_DIR = Path(__file__).parent / 'data' / 'vil_official'
TOL = dict(atol=1e-5, rtol=1e-4)
SUPPORTED = dict(conv_kind='2d', conv_kernel_size=3, proj_bias=True, norm_bias=True, legacy_norm=True)


def _cases():
    for path in sorted(FIXTURE_DIR.glob('*.pt')):
        fixture = torch.load(path, weights_only=True)
        assert fixture['format'] == 'vil-parity-v1', path
        for name in fixture['cases']:
            yield pytest.param(path, name, id=f'{path.stem}:{name}')


@pytest.fixture(scope='module')
def fixtures():
    return {path: torch.load(path, weights_only=True) for path in FIXTURE_DIR.glob('*.pt')}


def _build(config, checkpoint, **kwargs):
    unsupported = {k: config[k] for k, v in SUPPORTED.items() if config.get(k, v) != v}
    assert not unsupported, f'fixture uses options ViL does not implement: {unsupported}'
    model = ViL(arch=dict(embed_dims=config['dim'], num_layers=2 * config['depth']),
                img_size=config['input_shape'][1:], patch_size=config['patch_size'], mlstm_backend='parallel',
                init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)), **kwargs)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('path,name', list(_cases()))
def test_official_parity(fixtures, tmp_path, path, name):
    case = fixtures[path]['cases'][name]
    config, x = case['config'], case['input']
    checkpoint = tmp_path / 'official.pth'
    torch.save(case['state_dict'], checkpoint)
    _, head = split_backbone_and_head(convert_vil_state_dict(case['state_dict']))
    num_blocks = 2 * config['depth']

    with torch.no_grad():
        if 'block_outputs' in case:
            raw = _build(config, checkpoint, out_indices=range(num_blocks), out_type='raw')(x)
            for i, (ours, expected) in enumerate(zip(raw, case['block_outputs'])):
                torch.testing.assert_close(ours, expected, **TOL, msg=lambda m: f'block {i}: {m}')
        tokens = _build(config, checkpoint, out_indices=-1, out_type='raw', final_norm=True)(x)[0]
        if 'final_norm_output' in case:
            torch.testing.assert_close(tokens, case['final_norm_output'], **TOL)

        if case['kind'] == 'classifier':
            assert config['pooling'] == 'bilateral_flatten', config['pooling']
            pooled = _build(config, checkpoint, out_indices=-1, out_type='pooled', final_norm=True)(x)[0]
            pooled = F.layer_norm(pooled, pooled.shape[-1:], head['norm.weight'], head['norm.bias'])
            output = F.linear(pooled, head['fc.weight'], head['fc.bias'])
        else:
            # Official feature mode ends with its plain LayerNorm (`legacy_norm`, eps 1e-5) on the final-normed tokens.
            output = F.layer_norm(tokens, tokens.shape[-1:], head['norm.weight'], head['norm.bias'])
            if case['kind'] == 'features_image':
                h, w = (s // config['patch_size'] for s in x.shape[-2:])
                output = output.transpose(1, 2).unflatten(-1, (h, w))
            else:
                assert case['kind'] == 'features_tokens', case['kind']
        torch.testing.assert_close(output, case['expected'], **TOL)


def test_fixture_folder_is_not_empty():
    assert list(_cases()), f'no parity fixtures in {FIXTURE_DIR}'
