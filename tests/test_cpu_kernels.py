"""The optional C++ kernels of the mixer's CPU inference path (``mmseg_vil/models/layers/cpu_kernels``): the functions
of the PyTorch reference in float64 and float32, and a safe fallback where they are switched off or cannot be built.

The kernels are built once per session (and cached on disk by torch); every test that needs them skips where no
compiler is found.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.layers import cpu_kernels
from mmseg_vil.models.layers.mixer_ops import reference
from mmseg_vil.models.layers.mlstm import chunkwise_inference
from mmseg_vil.models.layers.vil_block import MLSTMMixer

TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-5)}


@pytest.fixture(scope='session')
def kernels():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ops = cpu_kernels.ops() if cpu_kernels.enabled() else None
    if ops is None:
        pytest.skip('the C++ CPU kernels are switched off or could not be built (no compiler?)')
    return ops


@pytest.fixture(params=['baseline', 'avx2', 'best'])
def isa(request, kernels, monkeypatch):
    """Each instruction set the kernels are built for (x86-64 with GCC; elsewhere all are the baseline), capped by
    MMSEG_VIL_CPU_ISA."""
    if request.param == 'best':
        monkeypatch.delenv('MMSEG_VIL_CPU_ISA', raising=False)
    else:
        monkeypatch.setenv('MMSEG_VIL_CPU_ISA', request.param)
    assert request.param != 'baseline' or kernels.instruction_set() == 'baseline'
    return kernels.instruction_set()


def _conv_qkv_inputs(batch, grid, inner, kernel, block, gates, dtype, biases=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return (randn(batch, math.prod(grid), inner), randn(inner, 1, kernel, kernel), randn(inner) if biases else None,
            randn(3, inner // block, block, block) / block, randn(3, inner) if biases else None,
            randn(gates, 3 * inner) / inner, randn(gates))


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('batch,grid,inner,heads,kernel,block,biases', [
    (1, (8, 8), 32, 4, 3, 4, True),
    (2, (5, 7), 24, 2, 3, 4, True),  # odd grid, batch 2
    (1, (1, 9), 16, 4, 3, 4, False),  # one row, no biases
    (2, (6, 1), 24, 3, 3, 2, True),  # one column, blocks of 2 (the generic product)
    (1, (6, 5), 36, 2, 5, 3, True),  # 5 x 5 kernel (tap by tap), blocks of 3, head dim 18
])
def test_conv_qkv_gates_equal_the_reference(kernels, isa, batch, grid, inner, heads, kernel, block, biases, reverse,
                                            dtype):
    x, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias = _conv_qkv_inputs(
        batch, grid, inner, kernel, block, 2 * heads, dtype, biases)
    x_conv, qkv = reference.conv_qkv_heads(x, grid, conv_weight, conv_bias, qkv_weight, qkv_bias, heads, reverse)
    gates = reference.folded_gate_preactivations(x_conv, x, qkv_weight, qkv_bias, gate_weight, gate_bias)
    ours = cpu_kernels.conv_qkv_gates(x, grid, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias,
                                      heads, reverse)
    for actual, expected in zip(ours, (x_conv, qkv, gates)):
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])
    # x's bias left to the kernel (the up-projection's): the function of x + x_bias, the zero padding included
    x_bias = torch.randn(inner, dtype=dtype, generator=torch.Generator().manual_seed(9))
    ours = cpu_kernels.conv_qkv_gates(x - x_bias, grid, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight,
                                      gate_bias, heads, reverse, x_bias=x_bias)
    for actual, expected in zip(ours, (x_conv, qkv, gates)):
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_conv_qkv_gates_write_into_the_cells_padded_layout(kernels, reverse):
    """q/k/v go straight into the real steps of the chunkwise cell's padded layout; its padding stays zero."""
    grid, heads, inner = (7, 9), 4, 32
    x, *weights = _conv_qkv_inputs(2, grid, inner, 3, 4, 2 * heads, torch.float64, seed=1)
    layout = chunkwise_inference.Layout(2, heads, math.prod(grid), inner // heads, 16, reverse, torch.float64, 'cpu')
    assert layout.pad
    conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias = weights
    _, qkv = reference.conv_qkv_heads(x, grid, conv_weight, conv_bias, qkv_weight, qkv_bias, heads, reverse)
    cpu_kernels.conv_qkv_gates(x, grid, *weights, heads, reverse, out=layout.real)
    torch.testing.assert_close(layout.real, qkv, rtol=1e-12, atol=1e-12)
    padding = layout.qkv[:, :, :, :layout.pad] if reverse else layout.qkv[:, :, :, math.prod(grid):]
    assert padding.abs().max() == 0


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('heads,head_dim,norm_bias', [(4, 8, True), (2, 5, False), (3, 96, True)])
def test_gated_output_equals_the_reference(kernels, isa, heads, head_dim, norm_bias, dtype):
    generator = torch.Generator().manual_seed(2)
    inner = heads * head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    h, x_conv, z = randn(2, 13, heads, head_dim) * 3 + 1, randn(2, 13, inner), randn(2, 13, inner) * 4
    norm_weight, skip = randn(inner), randn(inner)
    bias = randn(inner) if norm_bias else None
    expected = reference.gated_output(h, x_conv, z, norm_weight, bias, skip, 1e-5)
    out = z.clone()
    assert cpu_kernels.gated_output_(h, x_conv, out, norm_weight, bias, skip, 1e-5) is out
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    z_bias = randn(inner)  # z's bias left to the kernel (the up-projection's)
    out = cpu_kernels.gated_output_(h, x_conv, z - z_bias, norm_weight, bias, skip, 1e-5, z_bias=z_bias)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_gated_output_scales_a_strided_h_as_it_reads_it(kernels, isa, dtype):
    """h as the chunkwise cell leaves it, head-major ``(B, NH, steps, DH)`` with padding, read as ``(B, N, NH, DH)``
    with its rows' factors: the reference of ``h * factor`` token-major."""
    generator = torch.Generator().manual_seed(3)
    batch, n, heads, head_dim, pad = 2, 11, 3, 8, 5

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    mixed, factor = randn(batch, heads, n + pad, head_dim), randn(batch, heads, n + pad, 1).exp()
    h, h_scale = mixed[:, :, pad:].transpose(1, 2), factor[:, :, pad:].transpose(1, 2)
    x_conv, z, norm_weight, norm_bias, skip = randn(batch, n, heads * head_dim), randn(batch, n, heads * head_dim), \
        randn(heads * head_dim), randn(heads * head_dim), randn(heads * head_dim)
    expected = reference.gated_output((h * h_scale).contiguous(), x_conv, z, norm_weight, norm_bias, skip, 1e-5)
    out = cpu_kernels.gated_output_(h, x_conv, z.clone(), norm_weight, norm_bias, skip, 1e-5, h_scale)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_kernels_read_and_write_the_halves_of_one_product_in_place(kernels):
    """x and z as the column halves of one up-projection output (rows 2 E apart): conv_qkv reads x and the gated
    output writes z in place, with the bits of contiguous copies."""
    generator = torch.Generator().manual_seed(11)
    grid, heads, inner = (5, 7), 2, 16
    x, *conv_args = _conv_qkv_inputs(2, grid, inner, 3, 4, 2 * heads, torch.float32, seed=11)
    xz = torch.randn(2, math.prod(grid), 2 * inner, generator=generator)
    x_half, z_half = xz.chunk(2, dim=-1)
    x_half.copy_(x)
    assert cpu_kernels.rows_strided(x_half) and not x_half.is_contiguous()
    assert not cpu_kernels.rows_strided(x_half.transpose(0, 1)) and not cpu_kernels.rows_strided(xz[..., ::2])
    for ours, expected in zip(cpu_kernels.conv_qkv_gates(x_half, grid, *conv_args, heads, False),
                              cpu_kernels.conv_qkv_gates(x, grid, *conv_args, heads, False)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    h = torch.randn(2, math.prod(grid), heads, inner // heads, generator=generator)
    norm = [torch.randn(inner, generator=generator) for _ in range(3)]
    expected = cpu_kernels.gated_output_(h, x, z_half.contiguous(), *norm, 1e-5)
    assert cpu_kernels.gated_output_(h, x, z_half, *norm, 1e-5) is z_half
    torch.testing.assert_close(z_half, expected, rtol=0, atol=0)
    torch.testing.assert_close(x_half, x, rtol=0, atol=0)  # the other half untouched


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('update_bias,norm_bias', [(True, True), (False, False)], ids=['biases', 'no-biases'])
def test_add_layer_norm_is_the_residual_add_then_the_norm(kernels, isa, update_bias, norm_bias, dtype):
    """The sum written into the update bit for bit as the block's bias add and residual add round it; the norm that
    of F.layer_norm (37 rows, 40 channels: no multiple of a vector)."""
    gen = torch.Generator().manual_seed(0)
    x, update = (torch.randn(3, 37, 40, generator=gen, dtype=torch.float64).to(dtype) * 3 for _ in range(2))
    weight, bias, down_bias = (torch.randn(40, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    bias, down_bias = (bias if norm_bias else None), (down_bias if update_bias else None)
    expected_sum = (update if down_bias is None else update + down_bias) + x
    summed, normed = cpu_kernels.add_layer_norm_(x, update.clone(), weight, bias, 1e-5, down_bias)
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(normed, F.layer_norm(expected_sum, (40,), weight, bias, 1e-5), **TOLERANCES[dtype])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_backbone_inference_adds_the_residual_in_the_next_norm(kernels, dtype, monkeypatch):
    """Without autograd on the CPU each block's residual add and its down-projection's bias run in the next block's
    norm (the C++ kernel): the outputs of the blocks run one by one, within rounding (outputs after blocks 1 and 3 of
    4)."""
    from mmseg_vil.models.backbones import vil
    torch.manual_seed(0)
    model = vil.ViL(arch=dict(embed_dims=32, num_layers=4), img_size=32, patch_size=8, out_indices=(1, 3),
                    mlstm_backend='chunkwise').to(dtype)  # the C++ cell's path
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    calls, add_layer_norm_ = [], cpu_kernels.add_layer_norm_
    monkeypatch.setattr(cpu_kernels, 'add_layer_norm_', lambda *args: calls.append(args[-1]) or add_layer_norm_(*args))
    with torch.no_grad():
        fused = model.eval()(x)
        monkeypatch.setattr(vil, 'fuses_adds', lambda _: False)
        separate = model(x)
    # blocks 1 and 3 add their own update, blocks 2 and 4 the previous block's, with its down-projection's bias
    assert [bias is model.layers[i].mixer.proj_down.bias for i, bias in zip((0, 2), calls)] == [True, True]
    for got, want in zip(fused, separate):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def test_blocks_with_forward_hooks_are_called_one_by_one(kernels):
    """A forward hook on a block sees the block's output: the backbone then adds no residual in the next norm."""
    from mmseg_vil.models.backbones.vil import ViL
    model = ViL(arch=dict(embed_dims=32, num_layers=4), img_size=32, patch_size=8, out_indices=(3,),
                mlstm_backend='chunkwise').eval()
    seen = []
    model.layers[1].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(seen) == 1 and seen[0].shape == (2, 16, 32)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_silu_at_the_ends_of_the_exponentials_range(kernels, isa, dtype):
    """The kernels' own exponential: silu of large, tiny and extreme arguments as torch's, NaN kept (through the gated
    output with a zero norm part: h constant, so LayerNorm gives 0, bias 0, skip 1, x_conv 1: out = silu(z))."""
    z = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 20.0, -20.0, 80.0, -80.0, 87.5, -87.5, 88.7,
                      -88.7, 100.0, -100.0, 700.0, -700.0, 720.0, -720.0, 1e30, -1e30, math.inf, -math.inf,
                      math.nan, 1.0], dtype=dtype)
    z = z.view(1, -1, 1).expand(-1, -1, 4).contiguous()
    h, x_conv = torch.ones(1, z.shape[1], 1, 4, dtype=dtype), torch.ones_like(z)
    ones, zeros = torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype)
    out = cpu_kernels.gated_output_(h, x_conv, z.clone(), ones, zeros, ones, 1e-5)
    torch.testing.assert_close(out, F.silu(z), rtol=4 * torch.finfo(dtype).eps, atol=1e-35, equal_nan=True)


@pytest.mark.parametrize('backend', ['chunkwise', 'parallel'])
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_mixer_with_the_kernels_equals_the_pytorch_path(kernels, reverse, backend, monkeypatch):
    """The mixer without autograd on the CPU, float64, batch 2, an odd grid: the same with the kernels as without
    (the chunkwise backend: the inference path, the gated output in place as the C++ cell's epilogue; the
    up-projection's biases are left to the kernels either way)."""
    calls = []
    for module, name in ((cpu_kernels, 'conv_qkv_gates'), (cpu_kernels, 'gated_output_'),
                         (chunkwise_inference, 'cell_gated_output_')):
        def spy(*args, _f=getattr(module, name), _n=name, **kw):
            result = _f(*args, **kw)
            calls.append(_n if result is not False else f'{_n}: not run')
            return result

        monkeypatch.setattr(module, name, spy)
    torch.manual_seed(0)
    mixer = MLSTMMixer(16, num_heads=2, reverse=reverse, mlstm_backend=backend).double()
    for param in mixer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    x, grid = torch.randn(2, 35, 16, dtype=torch.float64), (5, 7)
    with torch.no_grad():
        ours = mixer(x, grid)
        ran = ['conv_qkv_gates', 'cell_gated_output_'] if backend == 'chunkwise' else ['conv_qkv_gates']
        assert calls == ran
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, '0')
        expected = mixer(x, grid)
    assert calls == ran + (['cell_gated_output_: not run'] if backend == 'chunkwise' else [])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def _compiled_cell(q, k, v, igate, fgate, chunk_size, reverse, block=None):
    """The C++ cell of q, k, v (B, NH, n, DH) written into its padded layout: (result, h (B, NH, n, DH) strided)."""
    batch, heads, n, head_dim = q.shape
    layout = chunkwise_inference.Layout(batch, heads, n, head_dim, chunk_size, reverse, q.dtype, 'cpu')
    for buffer, x in zip(layout.real, (q, k, v)):
        buffer.copy_(x)
    out = torch.full((batch, n, heads, head_dim), math.nan, dtype=q.dtype).transpose(1, 2)
    ranges = chunkwise_inference._RANGES[q.dtype]
    ok = cpu_kernels.ops().cell_(*layout.qkv, igate.to(q.dtype), F.logsigmoid(fgate.to(q.dtype)), layout.length,
                                 block or chunkwise_inference.SCORE_BLOCK_ROWS, reverse, 1e-6, *ranges,
                                 chunkwise_inference._LOG_FLUSH[q.dtype], out)
    return ok, out


def _relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('n,chunk_size,block', [
    (1, 64, 32),  # one step
    (15, 64, 32),  # one padded chunk
    (200, 16, 8),  # padded, two blocks per chunk
    (200, 37, 16),  # blocks of 16, 16 and 5 rows
    (256, 64, 64),  # one block: the whole chunk's scores
    (256, 32, 7),  # 7-row blocks
])
def test_cell_is_the_parallel_cell_in_float64(kernels, isa, n, chunk_size, block, reverse):
    """The recurrent C++ cell: the official function, for every split of the chunks into score blocks and padding
    (in front of the first chunk for reverse)."""
    from test_mlstm_backends import CHUNKWISE_FLOAT64_TOLERANCE, directed_reference, make_inputs
    inputs = make_inputs(n, 12, torch.float64, seed=7)[:5]
    ok, out = _compiled_cell(*inputs, chunk_size, reverse, block)
    assert ok
    assert _relative_error(out, directed_reference(inputs, reverse)) <= CHUNKWISE_FLOAT64_TOLERANCE


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_cell_float32_with_vil_t_heads(kernels, isa, reverse):
    from test_mlstm_backends import TOLERANCES as CELL_TOLERANCES
    from test_mlstm_backends import directed_reference, make_inputs
    inputs = make_inputs(1000, 96, torch.float32, seed=8, batch=1, heads=4)[:5]
    ok, out = _compiled_cell(*(x.float() for x in inputs), 64, reverse)
    assert ok and out.dtype == torch.float32
    assert _relative_error(out, directed_reference(inputs, reverse)) <= CELL_TOLERANCES[torch.float32]


def test_cell_reports_chunks_too_wide_for_its_ranges(kernels):
    """A key outweighing its chunk's first one by e^700: False (the general cell runs, tests/
    test_mlstm_chunkwise_inference.py)."""
    from test_mlstm_backends import make_inputs
    q, k, v, igate, fgate, _ = make_inputs(128, 12, torch.float64, seed=9)
    igate[..., 100] += 700
    assert not _compiled_cell(q, k, v, igate, fgate, 64, False)[0]


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('biases', [True, False], ids=['biases', 'no-biases'])
@pytest.mark.parametrize('z_half', [False, True], ids=['z-contiguous', 'z-half-of-a-product'])
def test_cell_with_the_gated_output_as_its_epilogue(kernels, isa, reverse, biases, z_half):
    """cell_gated_output_: the gated output (the reference's) of the cell's h (the parallel cell's), in place on z
    (contiguous, or the second half of the up-projection's columns); z's bias (the up-projection's) added by the
    epilogue. 3 heads, padded chunks, float64."""
    from test_mlstm_backends import directed_reference, make_inputs
    n, heads, head_dim = 150, 3, 8
    q, k, v, igate, fgate = make_inputs(n, head_dim, torch.float64, seed=4, heads=heads)[:5]
    generator = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    inner = heads * head_dim
    x_conv, z, norm_weight, skip = randn(2, n, inner), randn(2, n, inner), randn(inner), randn(inner)
    norm_bias, z_bias = (randn(inner), randn(inner)) if biases else (None, None)
    h = directed_reference([q, k, v, igate, fgate], reverse).transpose(1, 2).contiguous()
    expected = reference.gated_output(h, x_conv, z if z_bias is None else z + z_bias, norm_weight, norm_bias, skip,
                                      1e-5)
    if z_half:
        z = torch.cat([torch.full_like(z, math.nan), z], dim=-1).chunk(2, dim=-1)[1]
    layout = chunkwise_inference.Layout(2, heads, n, head_dim, 64, reverse, torch.float64, 'cpu')
    for buffer, x in zip(layout.real, (q, k, v)):
        buffer.copy_(x)
    with torch.no_grad():
        assert chunkwise_inference.cell_gated_output_(*layout.qkv, igate, fgate, layout.length, reverse, x_conv, z,
                                                      norm_weight, norm_bias, skip, 1e-5, z_bias)
    torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-10)


def test_cell_with_the_gated_output_leaves_z_where_the_general_cell_must_run(kernels):
    from test_mlstm_backends import make_inputs
    q, k, v, igate, fgate, _ = make_inputs(128, 12, torch.float64, seed=9)
    igate[:, 1, 100] += 700  # one sequence's chunk too wide: nothing of the others is written either
    layout = chunkwise_inference.Layout(2, 2, 128, 12, 64, False, torch.float64, 'cpu')
    for buffer, x in zip(layout.real, (q, k, v)):
        buffer.copy_(x)
    z = torch.randn(2, 128, 24, dtype=torch.float64)
    original = z.clone()
    with torch.no_grad():
        assert not chunkwise_inference.cell_gated_output_(*layout.qkv, igate, fgate, layout.length, False,
                                                          torch.randn_like(z), z, torch.ones(24, dtype=z.dtype),
                                                          None, torch.ones(24, dtype=z.dtype), 1e-5)
    torch.testing.assert_close(z, original, rtol=0, atol=0)


def test_without_blas_the_cells_pytorch_form_runs(kernels, monkeypatch):
    """Where PyTorch's library exports no BLAS the kernels still load; the cell then runs its PyTorch form."""
    from test_mlstm_backends import CHUNKWISE_FLOAT64_TOLERANCE, directed_reference, make_inputs

    class NoBlas:
        def __getattr__(self, name):
            if name == 'cell_':
                raise AssertionError('the C++ cell ran')
            return getattr(kernels, name)

        def blas_found(self):
            return False

    inputs = make_inputs(200, 12, torch.float64, seed=3)[:5]
    monkeypatch.setattr(cpu_kernels, 'ops', NoBlas)
    out = torch.empty(2, 2, 200, 12, dtype=torch.float64)
    layout = chunkwise_inference.Layout(2, 2, 200, 12, 64, False, torch.float64, 'cpu')
    for buffer, x in zip(layout.real, inputs[:3]):
        buffer.copy_(x)
    with torch.no_grad():
        assert chunkwise_inference.cell(*layout.qkv, *inputs[3:], layout.length, False, out)
    assert _relative_error(out, directed_reference(inputs, False)) <= CHUNKWISE_FLOAT64_TOLERANCE


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_many_chunks_run_the_compiled_cell(kernels, reverse):
    """With the state recurrence the C++ cell has no chunk limit: 100 chunks, the parallel cell's result."""
    from test_mlstm_backends import CHUNKWISE_FLOAT64_TOLERANCE, directed_reference, make_inputs

    import mmseg_vil.models.layers.mlstm.chunkwise_inference as inference
    n = 398
    inputs = make_inputs(n, 8, torch.float64, seed=5)[:5]
    layout = inference.Layout(2, 2, n, 8, 4, reverse, torch.float64, 'cpu')
    assert layout.qkv.shape[3] // layout.length >= inference.SCAN_MIN_CHUNKS
    for buffer, x in zip(layout.real, inputs[:3]):
        buffer.copy_(x)
    out = torch.empty(2, 2, n, 8, dtype=torch.float64)
    with torch.no_grad():
        assert inference.cell(*layout.qkv, *inputs[3:], layout.length, reverse, out)
    expected = directed_reference(inputs, reverse)
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= CHUNKWISE_FLOAT64_TOLERANCE


def test_threads_split_the_work_without_changing_the_result(kernels):
    """The kernels' parallel loops split rows, tokens and the cell's sequences: 2 threads give 1 thread's bits."""
    from test_mlstm_backends import make_inputs
    generator = torch.Generator().manual_seed(8)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    grid, heads, inner = (40, 37), 4, 64
    conv_inputs = _conv_qkv_inputs(2, grid, inner, 3, 4, 2 * heads, torch.float32, seed=8)
    h, z = randn(2, math.prod(grid), heads, inner // heads), randn(2, math.prod(grid), inner)
    norm = randn(inner), randn(inner), randn(inner)
    cell_inputs = [x.float() for x in make_inputs(500, 96, torch.float32, seed=8, batch=1, heads=4)[:5]]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            x_conv, qkv, gates = cpu_kernels.conv_qkv_gates(conv_inputs[0], grid, *conv_inputs[1:], heads, True)
            out = cpu_kernels.gated_output_(h, x_conv, z.clone(), *norm, 1e-5)
            ok, cell_out = _compiled_cell(*cell_inputs, 64, True)
            gated = torch.ones(1, 500, 384)  # z, overwritten by the cell's gated output
            layout = chunkwise_inference.Layout(1, 4, 500, 96, 64, False, torch.float32, 'cpu')
            for buffer, x in zip(layout.real, cell_inputs[:3]):
                buffer.copy_(x)
            assert ok and chunkwise_inference.cell_gated_output_(*layout.qkv, *cell_inputs[3:], layout.length, False,
                                                                 torch.ones(1, 500, 384), gated, torch.ones(384), None,
                                                                 torch.ones(384), 1e-5)
            results.append((x_conv, qkv, gates, out, cell_out, gated))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(two, one, rtol=0, atol=0)


def test_not_used_with_autograd_or_other_dtypes_or_devices(kernels):
    weight = torch.randn(4, requires_grad=True)
    x = torch.randn(2, 4)
    assert cpu_kernels.usable(x, weight.detach())
    assert not cpu_kernels.usable(x, weight)  # an autograd record is wanted
    with torch.no_grad():
        assert cpu_kernels.usable(x, weight)
        assert not cpu_kernels.usable(x.bfloat16(), weight.bfloat16())
        assert not cpu_kernels.usable(x, weight.double())  # mixed dtypes
        assert not cpu_kernels.usable(x.to('meta'), weight)
        with reference.FlopCounterMode(display=False):  # a dispatch mode watches
            assert not cpu_kernels.usable(x, weight)


@pytest.mark.parametrize('value', ['0', 'false', 'OFF'])
def test_switched_off_by_the_environment(value, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, value)
    assert not cpu_kernels.enabled()
    assert cpu_kernels.ops() is None
    assert not cpu_kernels.usable(torch.randn(3))


def test_a_failed_build_warns_once_and_the_pytorch_path_runs(monkeypatch):
    def fail():
        raise RuntimeError('no compiler here')

    monkeypatch.setattr(cpu_kernels, '_state', {'ops': None, 'tried': False})
    monkeypatch.setattr(cpu_kernels, '_build', fail)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    with pytest.warns(RuntimeWarning, match='no compiler here'):
        assert cpu_kernels.ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not cpu_kernels.usable(torch.randn(3))
        mixer = MLSTMMixer(16, num_heads=2, mlstm_backend='chunkwise').eval()
        with torch.no_grad():
            assert mixer(torch.randn(1, 12, 16), (3, 4)).shape == (1, 12, 16)
