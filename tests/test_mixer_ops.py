"""The mixer's Triton kernels (conv + SiLU + q/k/v; per-head norm + skip + gate) against the PyTorch reference.

Output and every gradient in float64 (tight) and float32, both traversal directions, kernel sizes 3 and 5, grids
that are not multiples of any tile. On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` in a
subprocess (the variable must be set before the kernels are decorated).
"""

import interpreted_runs
import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.layers.mixer_ops import reference

try:
    from mmseg_vil.models.layers.mixer_ops import triton_ops
except ImportError:  # no Triton
    triton_ops = None


def _kernel_device():
    if triton_ops is None:
        return None
    if torch.cuda.is_available():
        return 'cuda'
    return 'cpu' if triton_ops.kernels_interpreted() else None


KERNEL_DEVICE = _kernel_device()
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None, reason='mixer kernels need CUDA or TRITON_INTERPRET=1')
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(KERNEL_DEVICE).requires_grad_()


def _check(ours, expected, inputs, dtype, gen):
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype).to(KERNEL_DEVICE) for o in ours]
    grads = torch.autograd.grad(ours, inputs, grads_out)
    expected_grads = torch.autograd.grad(expected, inputs, grads_out)
    for out, exp in zip(ours, expected):
        torch.testing.assert_close(out, exp, **TOLERANCES[dtype])
    for grad, exp in zip(grads, expected_grads):
        torch.testing.assert_close(grad, exp, **TOLERANCES[dtype])


# float64 checks the formulas tightly; float32 the mixed-precision loads and stores of the CUDA path. (13, 11): 143
# tokens, several backward programs along the tokens (triton_ops.CONV_BACKWARD), the last one partly outside. (9, 7)
# with a 5x5 kernel: the input-gradient launch's 25 tap accumulators over several token tiles of a non-square grid,
# 6 of a tile's 8 channel groups. num_gates: 2 x heads (8 in every released model), 3 where no power of two is assumed.
CONV_CASES = [((5, 7), 16, 3, False, 4, torch.float64), ((5, 7), 16, 3, True, 2, torch.float64),
              ((13, 11), 8, 3, True, 3, torch.float64), ((9, 7), 24, 5, False, 2, torch.float64),
              ((3, 2), 136, 5, True, 8, torch.float64), ((1, 1), 8, 3, False, 2, torch.float64),
              ((9, 4), 72, 3, True, 8, torch.float32)]


@needs_kernels
@pytest.mark.parametrize('grid,chans,ksize,reverse,num_gates,dtype', CONV_CASES, ids=lambda value: str(value))
def test_conv_qkv_kernels_match_reference(grid, chans, ksize, reverse, num_gates, dtype):
    gen = torch.Generator().manual_seed(0)
    x = _randn(2, grid[0] * grid[1], chans, dtype=dtype, gen=gen)
    conv_weight, conv_bias = _randn(chans, 1, ksize, ksize, dtype=dtype, gen=gen), _randn(chans, dtype=dtype, gen=gen)
    qkv_weight, qkv_bias = _randn(3, chans // 4, 4, 4, dtype=dtype, gen=gen), _randn(3, chans, dtype=dtype, gen=gen)
    gate_weight, gate_bias = _randn(num_gates, 3 * chans, dtype=dtype, gen=gen), _randn(num_gates, dtype=dtype, gen=gen)
    inputs = (x, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias)
    ours = triton_ops.conv_qkv(x, *grid, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias, reverse)
    x_conv, qkv = reference.conv_qkv(x, grid, conv_weight, conv_bias, qkv_weight, qkv_bias, reverse)
    gates = reference.gate_preactivations(qkv.unflatten(-1, (3, 1, chans)).permute(2, 0, 3, 1, 4), gate_weight,
                                          gate_bias)
    _check(ours, (x_conv, qkv, gates), inputs, dtype, gen)
    # Without gate weights (the backward's recomputation): the same conv and q/k/v, no gates.
    x_conv_only, qkv_only, no_gates = triton_ops.conv_qkv(x, *grid, conv_weight, conv_bias, qkv_weight, qkv_bias, None,
                                                          None, reverse)
    assert no_gates.shape == (len(x), 0, x.shape[1])
    expected = reference.conv_qkv(x, grid, conv_weight, conv_bias, qkv_weight, qkv_bias, reverse)
    _check((x_conv_only, qkv_only), expected, inputs[:5], dtype, gen)


# Launch configurations other than the defaults (benchmarks/tune_mixer_kernels.py may pick them): larger and smaller
# token tiles (the forward's across the two images' boundary), several tiles per channel range, the input-gradient
# launch with tiles larger than the backward's, and the conv taps as a loop that is not unrolled (LOOP_TAPS).
OTHER_LAUNCHES = [dict(CONV_FORWARD=dict(BLOCK_T=32, BLOCK_G=4, num_warps=8, LOOP_TAPS=True),
                       CONV_BACKWARD=dict(BLOCK_T=16, BLOCK_G=4, num_warps=8, TILES=2, maxnreg=128),
                       CONV_INPUT_GRAD=dict(BLOCK_T=32, BLOCK_G=8, num_warps=4)),
                  dict(CONV_FORWARD=dict(BLOCK_T=2, BLOCK_G=2, num_warps=2, LOOP_TAPS=False),
                       CONV_BACKWARD=dict(BLOCK_T=4, BLOCK_G=2, num_warps=2, TILES=4, maxnreg=None),
                       CONV_INPUT_GRAD=dict(BLOCK_T=2, BLOCK_G=2, num_warps=2))]


@needs_kernels
@pytest.mark.parametrize('launches', OTHER_LAUNCHES, ids=['large', 'small'])
def test_conv_qkv_kernels_match_reference_with_other_launches(launches, monkeypatch):
    for name, config in launches.items():
        monkeypatch.setattr(triton_ops, name, config)
    test_conv_qkv_kernels_match_reference((5, 7), 32, 3, True, 3, torch.float64)


@needs_kernels
def test_kernels_read_halves_of_the_up_projection_in_place():
    """x and z as the halves of one (B, N, 2E) output (how the mixer passes them): the same results and gradients as
    from contiguous copies."""
    gen = torch.Generator().manual_seed(2)
    xz = _randn(2, 35, 32, dtype=torch.float64, gen=gen)
    params = [_randn(*shape, dtype=torch.float64, gen=gen) for shape in
              ((16, 1, 3, 3), (16,), (3, 4, 4, 4), (3, 16), (4, 48), (4,))]
    norm = [_randn(16, dtype=torch.float64, gen=gen) for _ in range(3)]
    h = _randn(2, 35, 2, 8, dtype=torch.float64, gen=gen)

    def run(x, z):
        x_conv, qkv, gates = triton_ops.conv_qkv(x, 5, 7, *params, True)
        return x_conv, qkv, gates, triton_ops.gated_output(h, x_conv, z, *norm, 1e-5)

    x, z = xz.chunk(2, dim=-1)
    assert x.stride(1) == 32
    ours, expected = run(x, z), run(x.contiguous(), z.contiguous())
    _check(ours, expected, (xz, h, *params, *norm), torch.float64, gen)


def _gated_output_inputs(heads, head_dim, layout, dtype, gen, h_scale=1.0):
    batch, n, chans = 2, 37, heads * head_dim
    if layout == 'heads_first':  # what the torch mLSTM backends return, seen as (B, N, NH, DH)
        h = _randn(batch, heads, n, head_dim, dtype=dtype, gen=gen).transpose(1, 2)
    else:
        h = _randn(batch, n, heads, head_dim, dtype=dtype, gen=gen)
    h = h * h_scale
    x_conv, z = _randn(batch, n, chans, dtype=dtype, gen=gen), _randn(batch, n, chans, dtype=dtype, gen=gen)
    weight, bias, skip = (_randn(chans, dtype=dtype, gen=gen) for _ in range(3))
    return h, x_conv, z, weight, bias, skip


@needs_kernels
# h_scale 1e-2: heads with a variance near the norm's eps, where an eps rounded to float32 shows in float64 results.
# Head dims (triton_ops._head_parts): 12, 48 and 96 as three tiles of 4, 16 and 32 dims, 8 and 64 as one, 40 as one
# tile padded to 64 (masked).
@pytest.mark.parametrize('heads,head_dim,layout,dtype,h_scale',
                         [(2, 8, 'heads_first', torch.float64, 1.0), (4, 12, 'tokens_first', torch.float64, 1e-2),
                          (1, 96, 'heads_first', torch.float32, 1.0), (2, 96, 'heads_first', torch.float64, 1.0),
                          (3, 48, 'tokens_first', torch.float64, 1.0), (2, 64, 'tokens_first', torch.float64, 1.0),
                          (2, 40, 'heads_first', torch.float64, 1.0)], ids=lambda value: str(value))
def test_gated_output_kernels_match_reference(heads, head_dim, layout, dtype, h_scale):
    gen = torch.Generator().manual_seed(1)
    inputs = _gated_output_inputs(heads, head_dim, layout, dtype, gen, h_scale)
    ours = triton_ops.gated_output(*inputs, 1e-5)
    expected = reference.gated_output(*inputs, 1e-5)
    _check((ours,), (expected,), inputs, dtype, gen)


@needs_kernels
@pytest.mark.parametrize('head_dim,layout', [(96, 'heads_first'), (40, 'tokens_first')])
def test_gated_output_backward_storing_the_output_kernels_match_reference(head_dim, layout):
    """The backward that also stores the recomputed output (the mixer's, STORE_OUT): the reference's output, and
    the gradients and parameter sums of the backward without it; three parts and one padded part, float64."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        inputs = _gated_output_inputs(2, head_dim, layout, torch.float64, gen)
        h, x_conv, z = inputs[:3]
        grad_out = torch.randn(x_conv.shape, generator=gen, dtype=torch.float64).to(KERNEL_DEVICE)
        expected = triton_ops.gated_output_backward(grad_out, *inputs, 1e-5)
        grad_h = torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device=h.device)
        grad_x_conv, grad_z, out = torch.empty_like(x_conv), torch.empty_like(z), torch.empty_like(x_conv)
        params = triton_ops.gated_output_backward_into(grad_out, *inputs, 1e-5, grad_h, grad_x_conv, grad_z, out)
    torch.testing.assert_close(out, reference.gated_output(*inputs, 1e-5), **TOLERANCES[torch.float64])
    for ours, exp in zip([grad_h, grad_x_conv, grad_z, *params], expected):
        torch.testing.assert_close(ours, exp, **TOLERANCES[torch.float64])


@needs_kernels
def test_vil_backbone_with_kernels_matches_reference_backbone():
    from mmseg_vil.models.backbones.vil import ViL
    torch.manual_seed(0)
    model = ViL(arch=dict(embed_dims=16, num_layers=2), img_size=(48, 32), patch_size=8, out_indices=(0, 1),
                mlstm_backend='parallel').double().to(KERNEL_DEVICE)
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64, device=KERNEL_DEVICE)
    ours = model(x)
    from unittest import mock
    with mock.patch('mmseg_vil.models.layers.mixer_ops._use_kernels', return_value=False):
        expected = model(x)
    for out, exp in zip(ours, expected):
        torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-11)


@needs_kernels
def test_mixer_core_under_activation_checkpointing_gives_the_same_gradients():
    """with_cp reruns each block's forward in the backward: mixer_core, called directly in eager mode
    (custom_op.CustomOp), must leave the same gradients as a run that kept its activations."""
    from mmseg_vil.models.backbones.vil import ViL
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = ViL(arch=dict(embed_dims=16, num_layers=2), img_size=(32, 24), patch_size=8, out_indices=(1,),
                    mlstm_backend='fused', with_cp=with_cp).double().to(KERNEL_DEVICE).train()
        x = torch.randn(2, 3, 32, 24, dtype=torch.float64, device=KERNEL_DEVICE)
        model(x)[0].square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


@pytest.mark.skipif(KERNEL_DEVICE is not None, reason='the kernel tests run in this process')
def test_mixer_kernels_under_triton_interpreter():
    interpreted_runs.check('test_mixer_kernels_under_triton_interpreter')


def _mixer_case(reverse: bool, backend: str = 'fused'):
    """A small mixer on a Triton mLSTM backend with every parameter perturbed (the zero/one inits hide gradient
    terms), its input and grid."""
    from mmseg_vil.models.layers.vil_block import MLSTMMixer
    torch.manual_seed(0)
    mixer = MLSTMMixer(16, num_heads=2, reverse=reverse, mlstm_backend=backend).double().to(KERNEL_DEVICE)
    with torch.no_grad():
        for param in mixer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(2, 35, 16, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    return mixer, x, (5, 7)


def _skip_unvalidated_chunkwise(backend: str, dtype: torch.dtype) -> None:
    from mmseg_vil.models.layers.mlstm.fused_chunkwise import op
    if backend == 'fused_chunkwise' and KERNEL_DEVICE == 'cuda' and not op.cuda_allowed(dtype):
        pytest.skip(f'fused_chunkwise on CUDA in {dtype} needs {op.CUDA_OVERRIDE_ENV}=1')


@needs_kernels
@pytest.mark.parametrize('backend', ['fused', 'fused_chunkwise'])
@pytest.mark.parametrize('reverse', [False, True])
def test_mixer_core_matches_composition_of_ops(reverse, backend, monkeypatch):
    """The one-node mixer (conv, q/k/v and gated output recomputed in the backward) is the composition of
    the separate ops: output and the gradient of the input and of every parameter, float64; with the chunkwise cell
    in chunks of 16 steps (3 chunks, the last one partial)."""
    from unittest import mock
    from mmseg_vil.models.layers import vil_block
    from mmseg_vil.models.layers.mlstm.fused_chunkwise import op
    _skip_unvalidated_chunkwise(backend, torch.float64)
    monkeypatch.setattr(op, 'DEFAULT_CHUNK_SIZE', 16)
    mixer, x, grid = _mixer_case(reverse, backend)
    inputs = (x, *mixer.parameters())
    with mock.patch.object(vil_block, 'mixer_core', wraps=vil_block.mixer_core) as core:
        ours = mixer(x, grid)
    assert core.call_count == 1 and core.call_args.args[-1] == (16 if backend == 'fused_chunkwise' else 0)
    with mock.patch.object(vil_block, 'use_mixer_core', return_value=False):
        expected = mixer(x, grid)
    grad_out = torch.randn_like(ours)
    for grad, exp in zip(torch.autograd.grad(ours, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(grad, exp, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-11)


def _saved_activation_elements(fn) -> int:
    """Elements of the tensors autograd keeps from ``fn()`` for the backward, parameters excluded (each storage
    once)."""
    saved = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


@needs_kernels
def test_mixer_core_keeps_less_activation_memory():
    """Per token the one-node mixer keeps x_mlstm | z, the cell output, gates and statistics, not the conv output,
    q | k | v and the gated output: at most half of what the separate ops keep (ViL-T's widths: 42 %). Per token = the
    growth from 35 to 70 tokens, so the stacked weights (a per-call constant) do not count."""
    from unittest import mock
    from mmseg_vil.models.layers import vil_block
    mixer, _, _ = _mixer_case(reverse=False)

    def per_token():
        small, large = (_saved_activation_elements(
            lambda: mixer(torch.randn(2, rows * 7, 16, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True),
                          (rows, 7))) for rows in (5, 10))
        return (large - small) / (2 * 35)

    core = per_token()
    with mock.patch.object(vil_block, 'use_mixer_core', return_value=False):
        separate = per_token()
    assert core <= 0.5 * separate, (core, separate)


@needs_kernels
@pytest.mark.parametrize('chunk_size', [0, 16])
def test_mixer_core_op_registration(chunk_size):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch (torch.compile's view) agree, with
    the quadratic (chunk size 0) and the chunkwise cell."""
    _skip_unvalidated_chunkwise('fused_chunkwise' if chunk_size else 'fused', torch.float64)
    from mmseg_vil.models.layers.mixer_ops.mixer_core import mixer_core
    mixer, _, grid = _mixer_case(reverse=True)
    xz = torch.randn(2, 35, 64, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    projections = (mixer.q_proj, mixer.k_proj, mixer.v_proj)
    args = (xz, *grid, mixer.conv.weight, mixer.conv.bias, *(p.weight for p in projections),
            *(p.bias for p in projections), mixer.igate.weight, mixer.fgate.weight, mixer.igate.bias, mixer.fgate.bias,
            mixer.outnorm.weight, mixer.outnorm.bias, mixer.learnable_skip, mixer.proj_down.weight,
            mixer.proj_down.bias, 2, 1e-5, True, chunk_size)
    torch.library.opcheck(mixer_core.op, args)


@needs_kernels
@pytest.mark.parametrize('backend', ['fused', 'fused_chunkwise'])
@pytest.mark.parametrize('name', ['cls_nonsquare_interp', 'feat_tokens_square'])
def test_mixer_core_official_parity(tmp_path, name, backend):
    """The official model's outputs (every block's, for the features case) with the Triton mLSTM backends, i.e.
    through mixer_core, in float32."""
    from pathlib import Path
    from test_vil_parity import check_official_parity
    _skip_unvalidated_chunkwise(backend, torch.float32)
    path = Path(__file__).parent / 'data' / 'vil_official' / 'vil_official_parity.pt'
    check_official_parity(tmp_path, path, name, 'ours', mlstm_backend=backend, device=KERNEL_DEVICE)


@pytest.mark.skipif(triton_ops is None, reason='needs Triton')
def test_launch_configs_from_a_file_replace_the_tables_and_bad_files_are_refused(tmp_path, monkeypatch):
    import json
    for name in triton_ops.LAUNCH_TABLES:  # restored after the test
        monkeypatch.setattr(triton_ops, name, dict(getattr(triton_ops, name)))
    good = tmp_path / 'best.json'
    good.write_text(json.dumps({'CONV_FORWARD': dict(BLOCK_T=32, BLOCK_G=8, num_warps=8, LOOP_TAPS=True)}))
    triton_ops.load_launch_configs(str(good))
    assert triton_ops.CONV_FORWARD == dict(BLOCK_T=32, BLOCK_G=8, num_warps=8, LOOP_TAPS=True)
    unknown = tmp_path / 'unknown.json'
    unknown.write_text(json.dumps({'CONV_SIDEWAYS': {}}))
    with pytest.raises(ValueError, match='unknown launch tables.*CONV_SIDEWAYS'):
        triton_ops.load_launch_configs(str(unknown))
    wrong_keys = tmp_path / 'wrong_keys.json'
    wrong_keys.write_text(json.dumps({'CONV_FORWARD': dict(BLOCK_T=16, BLOCK_G=16, num_warps=4, LOOP_TAPS=False),
                                      'GATED_OUTPUT': dict(TILE_ELEMENTS=512)}))
    with pytest.raises(ValueError, match='GATED_OUTPUT needs the keys'):
        triton_ops.load_launch_configs(str(wrong_keys))
    assert triton_ops.CONV_FORWARD['BLOCK_T'] == 32  # a refused file changes nothing
    not_json = tmp_path / 'not_json.json'
    not_json.write_text('{"CONV_FORWARD": ')
    with pytest.raises(ValueError, match='not_json.json .*is not JSON'):
        triton_ops.load_launch_configs(str(not_json))


def _relative_error(ours, expected):
    return ((ours.double() - expected).norm() / expected.norm()).item()


@needs_kernels
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_conv_qkv_gate_dots_in_16_bit(dtype, monkeypatch):
    """16-bit data in tiles of 16 or more tokens and channels take the gate products as ``tl.dot`` of the stored
    q | k | v and the gate weights rounded to the data's dtype (the official model's numerics under autocast): the
    gates within float32 accuracy of that float64 product. As under autocast, the conv's output is rounded before the
    SiLU: the pre-activation, the stored SiLU and q | k | v each within a unit in the last place of the float64
    function of the rounded pre-activation (against the unrounded float64 chain, the SiLU of a large negative
    pre-activation magnifies that rounding several times). The gradients within 16-bit accuracy."""
    monkeypatch.setattr(triton_ops, 'CONV_FORWARD', dict(BLOCK_T=64, BLOCK_G=8, num_warps=4, LOOP_TAPS=False))
    gen = torch.Generator().manual_seed(3)
    grid, chans, num_gates = (9, 8), 64, 8  # 72 tokens: a partial second token tile; two channel tiles
    x = _randn(2, grid[0] * grid[1], chans, dtype=dtype, gen=gen)
    params = [_randn(*shape, dtype=torch.float32, gen=gen) for shape in
              ((chans, 1, 3, 3), (chans,), (3, chans // 4, 4, 4), (3, chans), (num_gates, 3 * chans), (num_gates,))]
    with torch.no_grad():  # gate weights that the data's dtype holds: the interpreter rounds toward zero, CUDA to even
        params[4].copy_(params[4].to(dtype))
    x_conv, qkv, gates = triton_ops.conv_qkv(x, *grid, *params, True)
    pre, _ = triton_ops.conv_pre_qkv(x, *grid, *params[:2], None, True)
    inputs64 = [t.detach().double().requires_grad_() for t in (x, *params)]
    x_conv_ref, qkv_ref = reference.conv_qkv(inputs64[0], grid, *inputs64[1:5], True)
    x64, conv_w, conv_b, qkv_w, qkv_b = (t.detach() for t in inputs64[:5])
    rounding = dict(rtol=2 ** -7, atol=1e-5)  # a unit in the last place of bfloat16 (the interpreter truncates)
    torch.testing.assert_close(pre.double(), reference.depthwise_conv_tokens(x64, grid, conv_w, conv_b, True),
                               **rounding)
    act = F.silu(pre.double())
    torch.testing.assert_close(x_conv.detach().double(), act, **rounding)
    projected = torch.empty_like(qkv, dtype=torch.float64)
    reference.block_diagonal(act, qkv_w[:2], qkv_b[:2], projected[..., :2 * chans])
    reference.block_diagonal(x64, qkv_w[2:], qkv_b[2:], projected[..., 2 * chans:])
    torch.testing.assert_close(qkv.double(), projected, **rounding)
    stored = qkv.detach().double().unflatten(-1, (3, 1, chans)).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(gates.double(), reference.gate_preactivations(stored, *inputs64[5:]).detach(),
                               rtol=1e-5, atol=1e-5)
    gates_ref = reference.gate_preactivations(qkv_ref.unflatten(-1, (3, 1, chans)).permute(2, 0, 3, 1, 4),
                                              *inputs64[5:])
    grads_out = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
                 for t in (x_conv, qkv, gates)]
    grads = torch.autograd.grad((x_conv, qkv, gates), (x, *params), grads_out)
    expected = torch.autograd.grad((x_conv_ref, qkv_ref, gates_ref), inputs64, [g.double() for g in grads_out])
    for grad, exp in zip(grads, expected):
        assert _relative_error(grad, exp) < 1e-2


@needs_kernels
@pytest.mark.parametrize('block_t', [16, 64], ids=lambda t: f'BLOCK_T={t}')
def test_conv_qkv_gate_dots_and_fmas_agree(block_t, monkeypatch):
    """bfloat16: the gate products as ``tl.dot`` (tiles of 16 tokens and more) and as FMAs (tiles of 8 tokens) take
    the same rounded operands, so they agree within float32 accuracy; the conv output and q | k | v are identical."""
    gen = torch.Generator().manual_seed(4)
    x = _randn(1, 35, 32, dtype=torch.bfloat16, gen=gen)
    params = [_randn(*shape, dtype=torch.float32, gen=gen) for shape in
              ((32, 1, 3, 3), (32,), (3, 8, 4, 4), (3, 32), (3, 96), (3,))]
    outputs = []
    for config in (dict(BLOCK_T=block_t, BLOCK_G=8, num_warps=4, LOOP_TAPS=False),
                   dict(BLOCK_T=8, BLOCK_G=8, num_warps=4, LOOP_TAPS=True)):
        monkeypatch.setattr(triton_ops, 'CONV_FORWARD', config)
        outputs.append(triton_ops.conv_qkv(x, 5, 7, *params, False))
    (x_conv, qkv, gates), (x_conv_fma, qkv_fma, gates_fma) = outputs
    torch.testing.assert_close(x_conv, x_conv_fma, rtol=0, atol=0)
    torch.testing.assert_close(qkv, qkv_fma, rtol=0, atol=0)
    torch.testing.assert_close(gates, gates_fma, rtol=1e-5, atol=1e-5)
