"""Vim backbone: parity with the official hustvl/Vim on every case of tests/data/vim_official/*.pt, plus behaviour.

A case runs whenever :func:`vim_config_from_official` supports every official option it records (its ``config``);
otherwise it is skipped with the refusal, which must name the option. Each fixture's official state dict is written
to disk the way the released files are (weights under ``'model'``) and, converted once, in our layout, and loaded
through ``init_cfg=dict(type='Pretrained')``, the code path users take. See tests/data/vim_official/README*.md for
what each case computed.
"""
import importlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.backbones.vim import Vim, convert_official_vim
from mmseg_vil.models.backbones.vim_options import vim_config_from_official
from mmseg_vil.utils.checkpoint import CheckpointMismatchError, read_state_dict

FIXTURE_DIR = Path(__file__).parent / 'data' / 'vim_official'
CONVERTER = Path(__file__).parents[1] / 'tools' / 'model_converters' / 'vim2mmseg.py'
# Files of this repository: all their cases must run. Other files may hold options Vim refuses (skipped).
COMMITTED = ('vim_official_parity.pt', 'vim_official_options.pt')
TOL = dict(atol=1e-5, rtol=1e-4)
TINY = dict(embed_dims=16, num_layers=2)
# What each test builds itself; the rest of a translated config is the official model's.
READOUT_KEYS = ('type', 'img_size', 'out_indices', 'out_type', 'feature_source', 'final_norm', 'with_cls_token')


@lru_cache(maxsize=None)
def load_fixture(path):
    fixture = torch.load(path, weights_only=True)
    assert fixture['format'] == 'vim-parity-v1', path
    return fixture


def _cases():
    for path in sorted(FIXTURE_DIR.glob('*.pt')):
        for name in load_fixture(path)['cases']:
            yield pytest.param(path, name, id=f'{path.stem}:{name}')


def translate(config):
    """Our configs for an official config, or a skip naming the unsupported official option."""
    try:
        return vim_config_from_official(config)
    except ValueError as err:
        assert 'official option' in str(err), err
        pytest.skip(f'Vim refuses this case: {err}')


def build_official(case, checkpoint, img_size, **kwargs):
    """Our Vim for a fixture case (its official options), loaded from ``checkpoint`` through ``init_cfg``.

    A scan chunk of 5 tokens makes the fixtures' 16 to 26 token sequences cross chunk boundaries.
    """
    config = case.get('run_config', case['config'])
    translated = translate(config)['backbone']
    options = {k: v for k, v in translated.items() if k not in READOUT_KEYS}
    model = Vim(img_size=img_size, with_cls_token=config['if_cls_token'], scan_chunk_size=5,
                init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)), **{**options, **kwargs})
    model.init_weights()
    return model.eval()


def write_checkpoint(case, layout, directory):
    """The official state dict as released (under ``'model'``), or converted once to our keys."""
    state_dict = case['state_dict']
    if layout == 'ours':
        config = translate(case['config'])['backbone']
        state_dict = {'state_dict': convert_official_vim(state_dict, config.get('cls_position', 'middle'))}
    else:
        state_dict = {'model': state_dict}
    path = directory / f'{layout}.pth'
    torch.save(state_dict, path)
    return path


@pytest.mark.parametrize('layout', ['official', 'ours'])
@pytest.mark.parametrize('resize', ['at_load', 'at_run_time'])
@pytest.mark.parametrize('path,name', list(_cases()))
def test_official_parity(tmp_path, path, name, resize, layout):
    """The position embedding is resampled to the input's grid when loading, or from the checkpoint's grid when
    running; both must reproduce the official numbers."""
    case = load_fixture(path)['cases'][name]
    x, depth, state_dict = case['input'], case['config']['depth'], case['state_dict']
    translated = translate(case['config'])
    checkpoint = write_checkpoint(case, layout, tmp_path)
    img_size = tuple(x.shape[-2:]) if resize == 'at_load' else case['config']['img_size']

    def build(**kwargs):
        return build_official(case, checkpoint, img_size, **kwargs)

    with torch.no_grad():
        if 'pos_embed_resized' in case:
            ours = build(out_indices=-1).sequence_pos_embed(case['grid_hw'])
            torch.testing.assert_close(ours, case['pos_embed_resized'], **TOL)
        hidden = build(out_indices=range(depth), out_type='raw')(x)
        for i, (ours, expected) in enumerate(zip(hidden, case['layer_outputs']['hidden'])):
            torch.testing.assert_close(ours, expected, **TOL, msg=lambda m: f'mixer output of layer {i}: {m}')

        if 'out_indices' in case:  # seg-style: NCHW mixer outputs, no class token
            maps = build(out_indices=case['out_indices'])(x)
            torch.testing.assert_close(torch.stack(maps), case['expected'], **TOL)
            return
        readout = translated['backbone']['out_type']
        features = build(out_indices=-1, out_type=readout, feature_source='residual', final_norm=True)(x)[0]
        torch.testing.assert_close(features, case['expected_forward_features'], **TOL)
        if case['kind'] == 'classifier':
            logits = F.linear(features, state_dict['head.weight'], state_dict['head.bias'])
            torch.testing.assert_close(logits, case['expected'], **TOL)
            return
        tokens = build(out_indices=-1, out_type='raw', feature_source='residual')(x)[0]
        normed = build(out_indices=-1, out_type='raw', feature_source='residual', final_norm=True)(x)[0]
    torch.testing.assert_close(normed[:, case['cls_token_index']], features, **TOL)
    torch.testing.assert_close(tokens, case['expected'], **TOL)
    torch.testing.assert_close(normed, case['expected_post_norm'], **TOL)


def test_committed_fixture_files_are_fully_supported():
    """Skipping is for foreign fixture files: every case of this repository's files must run."""
    for file_name in COMMITTED:
        for case in load_fixture(FIXTURE_DIR / file_name)['cases'].values():
            vim_config_from_official(case.get('run_config', case['config']))


def test_out_indices_give_nchw_maps_at_stride_16():
    model = Vim(arch=dict(embed_dims=16, num_layers=24)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 4, 6)] * 4
    assert model.out_indices == (5, 11, 17, 23)  # the official default (tests/data/spec_excerpts.md, vim_spec §6.2)


def test_presets():
    """The released Vim-S (tests/data/spec_excerpts.md, vim_spec §1)."""
    small = Vim('small', out_indices=-1)
    assert (small.embed_dims, small.num_layers, small.layers[0].mixer.out_proj.in_features) == (384, 24, 768)
    with pytest.raises(ValueError, match=r"'huge'.*\['base', 'small', 'tiny'\]"):
        Vim('huge')
    with pytest.raises(ValueError, match='num_layers'):
        Vim(dict(embed_dims=16))


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="out_type must be one of .*'featmap'.* got 'tokens'"):
        Vim(TINY, out_type='tokens')
    with pytest.raises(ValueError, match='cls_token'):
        Vim(TINY, out_type='cls_token', with_cls_token=False)
    with pytest.raises(ValueError, match="feature_source='residual'"):
        Vim(TINY, final_norm=True)
    with pytest.raises(ValueError, match='out index 2 .* -2 to 1'):
        Vim(TINY, out_indices=2)


def test_featmap_drops_the_middle_class_token():
    x = torch.randn(1, 3, 48, 80)  # 3x5 grid, class token at 15 // 2 = 7
    raw_model = Vim(TINY, out_indices=-1, out_type='raw').eval()
    map_model = Vim(TINY, out_indices=-1).eval()
    map_model.load_state_dict(raw_model.state_dict())
    with torch.no_grad():
        raw, featmap = raw_model(x)[0], map_model(x)[0]
    assert raw.shape == (1, 16, 16) and featmap.shape == (1, 16, 3, 5)
    patches = torch.cat([raw[:, :7], raw[:, 8:]], dim=1)
    torch.testing.assert_close(featmap.flatten(2).transpose(1, 2), patches)


def test_sizes_not_divisible_by_the_patch_are_zero_padded():
    model = Vim(TINY, out_indices=-1).eval()
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        padded = model(F.pad(x, (0, 14, 0, 8)))[0]
        out = model(x)[0]
    assert out.shape == (1, 16, 3, 4)
    torch.testing.assert_close(out, padded)


@pytest.mark.parametrize('shape,message', [
    ((3, 32, 32), r'4-D .* got 3-D'),
    ((1, 4, 32, 32), 'in_channels=3, got 4 channels'),
    ((1, 3, 15, 32), r'15x32 is smaller than one patch.*patch_size=16'),
])
def test_bad_inputs_are_rejected(shape, message):
    with pytest.raises(ValueError, match=message):
        Vim(TINY, out_indices=-1)(torch.randn(shape))


def test_checkpoint_mismatch_lists_the_keys(tmp_path):
    state_dict = Vim(TINY, out_indices=-1).state_dict()
    del state_dict['layers.0.norm.weight']
    state_dict['layers.0.mixer.extra'] = torch.zeros(1)
    state_dict['layers.1.mixer.in_proj.weight'] = torch.zeros(7, 16)
    checkpoint = tmp_path / 'bad.pth'
    torch.save({'state_dict': state_dict}, checkpoint)
    model = Vim(TINY, out_indices=-1, init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    with pytest.raises(CheckpointMismatchError) as error:
        model.init_weights()
    message = str(error.value)
    assert 'missing (1): layers.0.norm.weight' in message
    assert 'unexpected (1): layers.0.mixer.extra' in message
    assert 'layers.1.mixer.in_proj.weight (7, 16) vs model (64, 16)' in message


def test_converter_cli_round_trip(tmp_path):
    case = load_fixture(FIXTURE_DIR / 'vim_official_parity.pt')['cases']['features_midcls_d24_L3_64to48x80']
    official, converted = tmp_path / 'official.pth', tmp_path / 'converted.pth'
    torch.save({'model': case['state_dict']}, official)
    spec = importlib.util.spec_from_file_location('vim2mmseg', CONVERTER)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main([str(official), str(converted)])

    ours = read_state_dict(str(converted))
    assert not any(key.startswith('head.') or key.endswith('A_b_log') for key in ours)
    assert ours.keys() == convert_official_vim(case['state_dict']).keys()
    official_numel = sum(v.numel() for k, v in case['state_dict'].items() if not k.startswith('head.'))
    assert sum(v.numel() for v in ours.values()) == official_numel
    x = case['input']
    with torch.no_grad():
        from_official = build_official(case, official, 64, out_indices=-1, out_type='raw')(x)[0]
        from_converted = build_official(case, converted, 64, out_indices=-1, out_type='raw')(x)[0]
    torch.testing.assert_close(from_converted, from_official, rtol=0, atol=0)
    with pytest.raises(SystemExit):  # already converted
        cli.main([str(converted), str(tmp_path / 'twice.pth')])


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 32, 48)
    plain = Vim(TINY, out_indices=(0, 1))
    checkpointed = Vim(TINY, out_indices=(0, 1), with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, checkpointed):
        sum(o.square().sum() for o in model(x)).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, msg=lambda m: f'{key}: {m}')



def test_drop_path_drops_whole_samples_and_rescales():
    """Rates rise linearly to drop_path_rate at the last layer; a kept mixer output is scaled by 1 / (1 - p)."""
    model = Vim(TINY, out_indices=-1, feature_source='residual', drop_path_rate=0.5)
    x = torch.randn(1, 3, 32, 32).expand(16, -1, -1, -1)  # layer 0 never drops (rate 0), layer 1 with p = 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        trained = model.train()(x)[0].flatten(1)
        evaluated = model.eval()(x)[0].flatten(1)[0]
    outcomes = torch.unique(trained, dim=0)
    assert len(outcomes) == 2
    torch.testing.assert_close(outcomes.sum(0), 2 * evaluated)  # dropped (r) + kept (r + 2h) = 2 (r + h)


def test_layer_depth_and_no_weight_decay():
    model = Vim(TINY, out_indices=-1)
    depths = {name: model.get_layer_depth('backbone.' + name, prefix='backbone.')
              for name in ('cls_token', 'cls_pos_embed', 'pos_embed', 'patch_embed.weight',
                           'layers.0.norm.weight', 'layers.1.mixer.forward_branch.A_log')}
    assert depths == {'cls_token': (0, 4), 'cls_pos_embed': (0, 4), 'pos_embed': (0, 4),
                      'patch_embed.weight': (0, 4), 'layers.0.norm.weight': (1, 4),
                      'layers.1.mixer.forward_branch.A_log': (2, 4)}
    assert model.get_layer_depth('decode_head.conv_seg.weight', prefix='backbone.') == (3, 4)
    with_norm = Vim(TINY, out_indices=-1, feature_source='residual', final_norm=True)
    assert with_norm.get_layer_depth('norm_f.weight') == (3, 4)
    assert model.no_weight_decay() == {'pos_embed', 'cls_token', 'cls_pos_embed'}
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert Vim(TINY, out_indices=-1, with_cls_token=False).no_weight_decay() == {'pos_embed'}


@pytest.mark.parametrize('scope', ['mmseg', 'mmpretrain'])
def test_registered(scope):
    registry = importlib.import_module(f'{scope}.registry').MODELS
    model = registry.build(dict(type='Vim', arch=TINY, out_indices=-1))
    assert isinstance(model, Vim)
