"""ViL backbone behaviour: presets, outputs, input handling, checkpoint loading, lr-decay depths."""
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmseg.registry import MODELS

import mmseg_vil  # noqa: F401
from mmseg_vil.models.backbones.vil import ViL
from mmseg_vil.models.backbones.vil_checkpoint import (convert_vil_state_dict, detect_vil_format,
                                                      released_to_official)
from mmseg_vil.utils.checkpoint import CheckpointMismatchError
from vil_official import official_to_released

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / 'tests' / 'data' / 'vil_official' / 'vil_official_parity.pt'
TINY = dict(embed_dims=32, num_layers=4)


def tiny(**kwargs):
    return ViL(arch=TINY, img_size=64, out_indices=(1, 3), mlstm_backend='parallel', **kwargs).eval()


@pytest.mark.parametrize('arch,dims', [('tiny', 192), ('small', 384), ('base', 768)])
def test_presets(arch, dims):
    """tests/data/spec_excerpts.md, vil_spec §2.4 and §4."""
    model = ViL(arch=arch)
    assert model.embed_dims == dims and len(model.layers) == 24
    assert model.layers[0].mixer.igate.out_features == 4  # four mLSTM heads in every preset
    assert [layer.mixer.reverse for layer in model.layers[:4]] == [False, True, False, True]


def test_tiny_parameter_count_matches_the_official_model():
    # tests/data/spec_excerpts.md, vil_spec §4 (counted on the official VisionLSTM2): ViL-T at 224 has 6,391,528
    # parameters including the 1000-class head of §2.7
    # (legacy LayerNorm 2*192*2 + Linear 384*1000 + 1000).
    backbone = ViL(arch='tiny', final_norm=True)
    head = 2 * 384 + 384 * 1000 + 1000
    assert sum(p.numel() for p in backbone.parameters()) + head == 6_391_528


def test_build_from_mmseg_config_with_custom_imports():
    cfg = Config(dict(custom_imports=dict(imports=['mmseg_vil'], allow_failed_imports=False),
                      model=dict(type='ViL', arch='small')))
    model = MODELS.build(cfg.model)
    assert isinstance(model, ViL) and model.embed_dims == 384


@pytest.mark.parametrize('size', [(64, 64), (50, 70), (16, 112)])
def test_featmap_shapes_any_input_size(size):
    outs = tiny()(torch.randn(2, 3, *size))
    grid = tuple(-(-s // 16) for s in size)
    assert len(outs) == 2 and all(o.shape == (2, 32, *grid) for o in outs)


def test_padding_is_bottom_right_with_zeros():
    model = tiny(out_type='raw')
    x = torch.randn(1, 3, 40, 56)
    padded = torch.nn.functional.pad(x, (0, 8, 0, 8))
    torch.testing.assert_close(model(x)[-1], model(padded)[-1])


def test_out_types_and_final_norm():
    model = tiny(out_type='pooled', final_norm=True)
    raw = tiny(out_type='raw', final_norm=True)
    raw.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 48, 64)
    tokens = raw(x)[-1]
    assert tokens.shape == (2, 12, 32)
    torch.testing.assert_close(model(x)[-1], torch.cat([tokens[:, 0], tokens[:, -1]], 1))
    # final_norm only touches the last block's output
    plain = tiny(out_type='raw')
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('norm.')})
    torch.testing.assert_close(plain(x)[0], raw(x)[0])
    assert not torch.allclose(plain(x)[1], tokens)


def test_conv_uses_the_true_grid_when_height_changes():
    # The official code reshapes with the build-time grid height; ours must give the same result as a model built
    # for the input's grid (position embedding resampled identically in both).
    built_small = tiny(out_type='raw')
    x = torch.randn(1, 3, 96, 64)
    built_big = ViL(arch=TINY, img_size=(96, 64), out_indices=(1, 3), mlstm_backend='parallel', out_type='raw').eval()
    built_big.load_state_dict(built_small.state_dict())  # load hook resamples 4x4 -> 6x4
    torch.testing.assert_close(built_small(x)[-1], built_big(x)[-1])


@pytest.mark.parametrize('x,match', [
    (torch.randn(3, 64, 64), '4-D'),
    (torch.randn(1, 1, 64, 64), 'in_channels=3'),
    (torch.randn(1, 3, 8, 64), 'smaller than one 16x16 patch'),
])
def test_bad_input_errors(x, match):
    with pytest.raises(ValueError, match=match):
        tiny()(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="Unknown ViL arch 'huge'.*tiny"):
        ViL(arch='huge')
    with pytest.raises(ValueError, match=r'out_indices \(24,\) invalid.*\[-24, 23\]'):
        ViL(out_indices=24)
    with pytest.raises(ValueError, match='out_type'):
        ViL(out_type='cls_token')


def test_get_layer_depth_groups_block_pairs():
    """group_two_blocks of the official UperNet recipe (tests/data/spec_excerpts.md, vil_spec §7)."""
    model = ViL(arch='tiny')
    assert model.get_layer_depth('backbone.pos_embed', 'backbone.') == (0, 14)
    assert model.get_layer_depth('backbone.patch_embed.weight', 'backbone.') == (0, 14)
    assert model.get_layer_depth('backbone.layers.0.norm.weight', 'backbone.') == (1, 14)
    assert model.get_layer_depth('backbone.layers.1.mixer.conv.weight', 'backbone.') == (1, 14)
    assert model.get_layer_depth('backbone.layers.23.mixer.igate.bias', 'backbone.') == (12, 14)
    assert model.get_layer_depth('decode_head.conv_seg.weight', 'backbone.') == (13, 14)


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    """with_cp: every block runs again in the backward (its activations were not kept), replaying the same
    drop-path draws, so the gradients are those of the plain model."""
    x = torch.randn(2, 3, 32, 32)
    calls, grads = {}, {}
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = ViL(arch=TINY, img_size=32, out_indices=(3,), with_cp=with_cp, drop_path_rate=0.5,
                    mlstm_backend='parallel').train()
        counts = calls[with_cp] = [0] * len(model.layers)
        for index, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(lambda *_, index=index: counts.__setitem__(index, counts[index] + 1))
        model(x)[0].square().sum().backward()
        grads[with_cp] = {name: p.grad for name, p in model.named_parameters()}
    assert model.layers[0].drop_path.drop_prob == 0 and model.layers[3].drop_path.drop_prob == pytest.approx(0.5)
    assert calls == {False: [1, 1, 1, 1], True: [2, 2, 2, 2]}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, msg=lambda m: f'{name}: {m}')
    with torch.no_grad():  # nothing to recompute without gradients
        model(x)
    assert calls[True] == [3, 3, 3, 3]


def _fixture_state_dict():
    return torch.load(FIXTURE, weights_only=True)['cases']['cls_square']['state_dict']


def test_released_key_mapping_examples():
    mapped = released_to_official({
        'xlstm.blocks.3.xlstm.conv1d.weight': 0, 'xlstm.blocks.0.xlstm_norm.bias': 1,
        'xlstm.blocks.5.xlstm.mlstm_cell.fgate.bias': 2, 'xlstm.post_blocks_norm.weight': 3,
        'head.0.weight': 4, 'head.1.bias': 5, 'xlstm.blocks.0.xlstm.causal_mask': 6})
    assert mapped == {'blocks.1.rowwise_from_bot_right.layer.conv.weight': 0,
                      'blocks.0.rowwise_from_top_left.norm.bias': 1,
                      'blocks.2.rowwise_from_bot_right.layer.mlstm_cell.fgate.bias': 2, 'norm.weight': 3,
                      'legacy_norm.weight': 4, 'head.bias': 5}


def test_released_official_and_ours_formats_load_identically(tmp_path):
    official = _fixture_state_dict()
    released = {'state_dict': official_to_released(official), 'ctor_kwargs': {'dim': 64}}
    assert detect_vil_format(released['state_dict']) == 'released'
    assert detect_vil_format(official) == 'official'
    ours = convert_vil_state_dict(official)
    assert detect_vil_format(ours) == 'ours'
    assert torch.equal(ours['layers.0.norm.weight'], official['blocks.0.rowwise_from_top_left.norm.weight'] + 1)
    outputs = []
    for name, payload in [('released.th', released), ('official.pth', official), ('ours.pth', ours),
                          ('mmseg.pth', {'state_dict': {'backbone.' + k: v for k, v in ours.items()}})]:
        torch.save(payload, tmp_path / name)
        model = ViL(arch=dict(embed_dims=64, num_layers=8), img_size=64, out_indices=-1, out_type='raw',
                    final_norm=True, mlstm_backend='parallel',
                    init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / name)))
        model.init_weights()
        outputs.append(model.eval()(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))[0])
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)


def test_pos_embed_is_resampled_at_load_time(tmp_path):
    official = _fixture_state_dict()
    torch.save(official, tmp_path / 'ckpt.pth')
    model = ViL(arch=dict(embed_dims=64, num_layers=8), img_size=128, out_indices=-1,
                init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'ckpt.pth')))
    model.init_weights()
    expected = torch.nn.functional.interpolate(official['pos_embed.embed'].permute(0, 3, 1, 2), size=(8, 8),
                                               mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.pos_embed.data, expected)


def test_mismatched_checkpoint_is_an_error_listing_keys(tmp_path):
    official = dict(_fixture_state_dict())
    del official['blocks.0.rowwise_from_top_left.layer.proj_up.bias']
    official['blocks.0.rowwise_from_top_left.layer.extra'] = torch.zeros(1)
    torch.save(official, tmp_path / 'bad.pth')
    model = ViL(arch=dict(embed_dims=64, num_layers=8), img_size=64, out_indices=-1,
                init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'bad.pth')))
    with pytest.raises(CheckpointMismatchError) as err:
        model.init_weights()
    assert 'missing (1): layers.0.mixer.proj_up.bias' in str(err.value)
    assert 'unexpected (1): layers.0.mixer.extra' in str(err.value)
    wider = ViL(arch=dict(embed_dims=32, num_layers=8), img_size=64, out_indices=-1,
                init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'bad.pth')))
    with pytest.raises(CheckpointMismatchError, match=r'shape mismatch \(\d+\): .*patch_embed.weight'):
        wider.init_weights()
    with pytest.raises(ValueError, match='Not a Vision-LSTM checkpoint'):
        convert_vil_state_dict({'conv1.weight': torch.zeros(1)})


def test_converter_tool(tmp_path):
    torch.save({'state_dict': official_to_released(_fixture_state_dict())}, tmp_path / 'vil.th')
    subprocess.run([sys.executable, str(ROOT / 'tools/model_converters/vil2mmseg.py'), str(tmp_path / 'vil.th'),
                    str(tmp_path / 'out.pth')], check=True, capture_output=True)
    converted = torch.load(tmp_path / 'out.pth', weights_only=True)
    model = ViL(arch=dict(embed_dims=64, num_layers=8), img_size=64, out_indices=-1, final_norm=True)
    model.load_state_dict(converted['state_dict'], strict=True)
    assert converted['meta']['source_format'] == 'released'


def test_block_diagonal_projection_equals_blockwise_product():
    from mmseg_vil.models.layers.vil_block import BlockDiagonalLinear
    proj = BlockDiagonalLinear(16)
    torch.nn.init.normal_(proj.weight)
    torch.nn.init.normal_(proj.bias)
    x = torch.randn(3, 5, 16)
    expected = torch.stack([x[..., 4 * b:4 * b + 4] @ proj.weight[b].T for b in range(4)], -2).flatten(-2)
    torch.testing.assert_close(proj(x), expected + proj.bias)


def test_flop_counter_sees_the_block_products_not_the_dense_tiles():
    """The fast form multiplies 16-channel tiles (zeros included); a FLOP count must be the model's: 2 E S per token."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmseg_vil.models.layers.mixer_ops.reference import block_diagonal
    weight, bias, x = torch.randn(2, 8, 4, 4), torch.randn(2, 32), torch.randn(3, 5, 32)
    fast = block_diagonal(x, weight, bias, torch.empty(3, 5, 96)[..., 32:])
    with FlopCounterMode(display=False) as counter:
        counted = block_diagonal(x, weight, bias, torch.empty(3, 5, 96)[..., 32:])
    torch.testing.assert_close(counted, fast)
    assert counter.get_total_flops() == 2 * (3 * 5) * 2 * 32 * 4


@pytest.mark.parametrize('count_flops', [False, True])
def test_head_layout_projections_and_gates_equal_token_major(count_flops):
    """The CPU path writes q/k/v straight into the mLSTM's head layout and takes the gates from it: the same values
    as the token-major projections (the kernels' layout) and the gates of ``cat([q, k, v])``, also under a FLOP
    counter (which runs the products per block)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmseg_vil.models.layers.mixer_ops.reference import (block_diagonal, block_diagonal_heads,
                                                               gate_preactivations)
    batch, n, heads, head_dim = 2, 7, 3, 32
    f64 = dict(dtype=torch.float64)
    weight, bias = torch.randn(3, heads * head_dim // 4, 4, 4, **f64), torch.randn(3, heads * head_dim, **f64)
    x = torch.randn(batch, n, heads * head_dim, **f64)
    token_major = block_diagonal(x, weight, bias)
    heads_layout = torch.empty(3, batch, heads, n, head_dim, **f64)
    with FlopCounterMode(display=False) if count_flops else contextlib.nullcontext():
        block_diagonal_heads(x, weight, bias, heads, heads_layout)
    expected = token_major.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(heads_layout, expected)
    gate_weight, gate_bias = torch.randn(2 * heads, 3 * heads * head_dim, **f64), torch.randn(2 * heads, **f64)
    gates = (token_major @ gate_weight.T + gate_bias).transpose(1, 2)
    torch.testing.assert_close(gate_preactivations(heads_layout, gate_weight, gate_bias), gates)
    torch.testing.assert_close(gate_preactivations(expected, gate_weight, gate_bias), gates)


def test_blocks_get_contiguous_token_gradients_from_feature_maps():
    """The feature maps are channel-first views of the tokens: their gradient must reach the blocks contiguous (and the
    tokens stay contiguous forward), or every residual add, norm and product of the backward runs on strides."""
    model = ViL(arch=dict(embed_dims=32, num_layers=2), img_size=64, out_indices=(0, 1))
    layouts = []
    for block in model.layers:
        block.register_full_backward_hook(
            lambda module, grad_in, grad_out: layouts.append((grad_out[0].is_contiguous(), grad_in[0].is_contiguous())))
        block.register_forward_hook(lambda module, args, out: layouts.append((args[0].is_contiguous(),)))
    outs = model(torch.randn(2, 3, 64, 64))
    sum(out.mean() for out in outs).backward()
    assert layouts and all(all(flags) for flags in layouts), layouts


@pytest.mark.parametrize('with_qkv_bias', [True, False])
def test_folded_gate_preactivations_equal_gates_of_the_projections(with_qkv_bias):
    """The CPU path's gates from the projections' inputs (folded weights) equal the official gates of q | k | v."""
    from mmseg_vil.models.layers.mixer_ops.reference import (block_diagonal, folded_gate_preactivations,
                                                               gate_preactivations)
    batch, n, heads, head_dim = 2, 7, 3, 32
    f64 = dict(dtype=torch.float64)
    inner = heads * head_dim
    x, x_conv = torch.randn(batch, n, inner, **f64), torch.randn(batch, n, inner, **f64)
    weight = torch.randn(3, inner // 4, 4, 4, **f64)
    bias = torch.randn(3, inner, **f64) if with_qkv_bias else None
    gate_weight, gate_bias = torch.randn(2 * heads, 3 * inner, **f64), torch.randn(2 * heads, **f64)
    qk = block_diagonal(x_conv, weight[:2], None if bias is None else bias[:2])
    v = block_diagonal(x, weight[2:], None if bias is None else bias[2:])
    qkv = torch.cat([qk, v], -1).unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(folded_gate_preactivations(x_conv, x, weight, bias, gate_weight, gate_bias),
                               gate_preactivations(qkv, gate_weight, gate_bias))


def test_unknown_mlstm_backend_is_refused_at_construction():
    """A config typo fails when the model is built, not at the first training step."""
    with pytest.raises(ValueError, match=r"mlstm_backend='fused-chunkwise' is not available here; choose one of"):
        ViL(arch=TINY, img_size=32, out_indices=(3,), mlstm_backend='fused-chunkwise')
