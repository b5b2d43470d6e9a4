"""Every mLSTM backend computes the parallel cell's function and its full autograd gradients.

The reference is the formula of vil_spec §2.6 (tests/data/spec_excerpts.md) evaluated in float64 on the same
(dtype-rounded) inputs; it is written out here because ``mlstm_parallel`` keeps its gates in float32 even for float64
inputs. Gates are ViL-like
(forget pre-activations +3..+6, input ~N(0,1)) with some strongly negative forget gates, so that the max stabiliser
and both branches of the normaliser max(|q.n|, exp(-m)) matter.

The fused Triton kernels run on CUDA when there is one. Otherwise they run on CPU under ``TRITON_INTERPRET=1``, which
must be set before the kernels are decorated, i.e. before ``mmseg_vil`` is imported: one test re-runs this file's
fused tests in a subprocess with the variable set, and fails if any of them is skipped or Triton is missing. Under
the interpreter the kernels use their own tile sizes, except in the preset and split head-dim tests and some of the
mixer-view tests, which force the CUDA launch configurations. The fused kernels also run on q, k, v and the gates as
the ViL mixer passes them (strided views of one projection output), in both directions, and are checked to copy nothing;
the chunkwise form, on the same views, to copy q, k and v once (into its chunk layout) and to flip none of them.
"""
import contextlib
import functools
import math

import interpreted_runs
import pytest
import torch
import torch.nn.functional as F
from op_log import OpLog
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import mmseg_vil.models.layers.mlstm.chunkwise as chunkwise_module
from mmseg_vil.models.layers.mlstm import MLSTM_BACKENDS, mlstm
from mmseg_vil.models.layers.mlstm.chunkwise import mlstm_chunkwise

SEQ_LENS = (1, 15, 64, 196, 200, 1024)
HEAD_DIMS = (8, 12, 96)
EPS = 1e-6
# Max error of output and gradients, relative to the larger of the tensor's own max and FLOOR x the case's largest
# gradient (a gradient that cancels to ~0, e.g. dq at N=1 on the |q.n| branch, is judged on the gradients' scale).
FLOOR = 1e-2
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
}
# The parallel form differences one float32 cumsum of log forget gates (F_t - F_s), which loses digits as |F| grows.
# In bfloat16 it also computes scores and normaliser in bfloat16 (gradients off by O(1) at N >= 196), so it is not
# held to the bfloat16 tolerance at all; the other backends accumulate in float32.
PARALLEL_FLOAT32_TOLERANCE = 1e-3
# The chunkwise form only regroups the parallel form's float64 sums (no quadratic-form shortcut loses digits).
CHUNKWISE_FLOAT64_TOLERANCE = 1e-12
# exp(100) = 2.7e43 is beyond float32's 3.4e38: only a working stabiliser keeps such gates finite.
LARGE_IGATE = 100.0


def reference_float64(q, k, v, igate, fgate):
    """vil_spec §2.6 (tests/data/spec_excerpts.md) in float64; also returns whether each row's normaliser took the
    exp(-m) branch."""
    n = q.shape[-2]
    cum_log_f = torch.cumsum(F.logsigmoid(fgate), dim=-1)
    log_d = cum_log_f.unsqueeze(-1) - cum_log_f.unsqueeze(-2) + igate.unsqueeze(-2)
    log_d = log_d.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float('-inf'))
    m = log_d.amax(dim=-1, keepdim=True)
    c = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])) * torch.exp(log_d - m)
    row_sum = c.sum(dim=-1, keepdim=True).abs()
    normaliser = torch.maximum(row_sum, torch.exp(-m))
    return (c / (normaliser + EPS)) @ v, row_sum < torch.exp(-m)


def make_inputs(n, head_dim, dtype, seed, batch=2, heads=2, large_input_gates=False):
    """q, k, v, igate, fgate and an output gradient, in float64 but already rounded to ``dtype``.

    ``large_input_gates``: input gates LARGE_IGATE + N(0, 1) instead of N(0, 1). The normaliser's floor exp(-m) is
    then ~e^-100, so a row sum that cancels to ~0 would make the cell ill-conditioned (float32 rounding of the gates
    alone would move the float64 result by 1e-3); q, k >= 0 keep every score positive and the row sums large.
    """
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad_h = (torch.randn(batch, heads, n, head_dim, generator=gen, dtype=torch.float64) for _ in range(4))
    igate = torch.randn(batch, heads, n, generator=gen, dtype=torch.float64)
    if large_input_gates:
        q, k, igate = q.abs(), k.abs(), igate + LARGE_IGATE
    fgate = 3 + 3 * torch.rand(batch, heads, n, generator=gen, dtype=torch.float64)
    strongly_negative = torch.rand(batch, heads, n, generator=gen) < 0.1
    fgate[strongly_negative] = -4 + torch.randn(int(strongly_negative.sum()), generator=gen, dtype=torch.float64)
    return [x.to(dtype).double() for x in (q, k, v, igate, fgate, grad_h)]


def flip_tokens(x):
    """The token order of a ``(B, NH, N, DH)`` or ``(B, NH, N)`` tensor, reversed."""
    return x.flip(-2 if x.dim() == 4 else -1)


def directed_reference(inputs, reverse):
    """The float64 reference output in the cell's direction: for ``reverse``, the causal cell on the token-flipped
    inputs, flipped back."""
    if reverse:
        return flip_tokens(reference_float64(*map(flip_tokens, inputs))[0])
    return reference_float64(*inputs)[0]


@functools.lru_cache(maxsize=None)
def reference_case(n, head_dim, dtype, seed=0, reverse=False, **shape_and_gates):
    """Inputs, output gradient, reference output and reference input gradients of one case (``shape_and_gates``:
    ``batch``, ``heads``, ``large_input_gates`` of :func:`make_inputs`). ``reverse``: the anti-causal cell, whose
    reference is the causal one on the token-flipped inputs, flipped back."""
    *inputs, grad_h = make_inputs(n, head_dim, dtype, seed, **shape_and_gates)
    inputs = [x.requires_grad_() for x in inputs]
    expected = directed_reference(inputs, reverse)
    expected_grads = torch.autograd.grad(expected, inputs, grad_h)
    return [x.detach() for x in inputs], grad_h, expected.detach(), expected_grads


def backend_errors(backend, n, head_dim, dtype, device='cpu', reverse=False, **shape_and_gates):
    """Relative max errors of a backend's output and (q, k, v, igate, fgate) gradients against the reference."""
    inputs, grad_h, expected, expected_grads = reference_case(n, head_dim, dtype, reverse=reverse, **shape_and_gates)
    actual_inputs = [x.to(device, dtype).requires_grad_() for x in inputs]
    actual = mlstm(*actual_inputs, backend=backend, reverse=reverse)
    assert actual.dtype == dtype and actual.shape == expected.shape
    actual_grads = torch.autograd.grad(actual, actual_inputs, grad_h.to(device, dtype))
    return relative_errors(actual, actual_grads, expected, expected_grads)


def relative_errors(actual, actual_grads, expected, expected_grads):
    """Max error of h and each gradient relative to max(|expected|, FLOOR x |h| or the largest expected gradient)."""
    grad_scale = max(g.abs().max().item() for g in expected_grads)
    names = ('h', 'dq', 'dk', 'dv', 'digate', 'dfgate')
    errors = {}
    for name, a, e in zip(names, (actual, *actual_grads), (expected, *expected_grads)):
        floor = FLOOR * (e.abs().max().item() if name == 'h' else grad_scale)
        errors[name] = (a.detach().cpu().double() - e).abs().max().item() / max(e.abs().max().item(), floor)
    return errors


def assert_close_to_reference(backend, n, head_dim, dtype, tolerance, device='cpu', **shape_and_gates):
    errors = backend_errors(backend, n, head_dim, dtype, device, **shape_and_gates)
    assert all(math.isfinite(e) and e <= tolerance for e in errors.values()), \
        f'{backend} {dtype} N={n} DH={head_dim} {shape_and_gates}: errors {errors} over {tolerance}'


def test_inputs_exercise_both_normaliser_branches():
    *inputs, _ = make_inputs(200, 12, torch.float64, seed=0)
    _, floor_branch = reference_float64(*inputs)
    assert floor_branch.any() and not floor_branch.all()


@pytest.mark.parametrize('head_dim', HEAD_DIMS)
@pytest.mark.parametrize('n', SEQ_LENS)
def test_parallel_float32_matches_reference(n, head_dim):
    assert_close_to_reference('parallel', n, head_dim, torch.float32, PARALLEL_FLOAT32_TOLERANCE)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('head_dim', HEAD_DIMS)
@pytest.mark.parametrize('n', SEQ_LENS)
def test_chunkwise_matches_reference(n, head_dim, dtype):
    assert_close_to_reference('chunkwise', n, head_dim, dtype, TOLERANCES[dtype])


@pytest.mark.parametrize('n,dtype,tolerance', [(196, torch.float32, PARALLEL_FLOAT32_TOLERANCE),
                                               (1024, torch.float32, TOLERANCES[torch.float32]),
                                               (196, torch.bfloat16, TOLERANCES[torch.bfloat16])])
def test_auto_on_cpu_matches_reference(n, dtype, tolerance):
    """Covers auto's CPU choices: parallel for short float32, chunkwise for long or half precision."""
    assert_close_to_reference('auto', n, 12, dtype, tolerance)


@pytest.mark.parametrize('backend,reverse', [('parallel', False), ('chunkwise', False), ('chunkwise', True)])
def test_large_input_gates_stay_finite_and_exact(backend, reverse):
    """Input gates around 100: exp(i) overflows float32 unless every exponent is taken relative to the max
    stabiliser m (per row; in the chunkwise form also per chunk and per carried state). N=200 spans 4 chunks."""
    assert_close_to_reference(backend, 200, 12, torch.float32, TOLERANCES[torch.float32], large_input_gates=True,
                              reverse=reverse)


@pytest.fixture(params=['decay-matrix', 'scan'])
def state_scheme(request, monkeypatch):
    """The chunkwise states combined by the (chunks x chunks) decay matrix, or by the scan over the chunks
    (``SCAN_MIN_CHUNKS`` lowered to 2: every case of several chunks scans)."""
    if request.param == 'scan':
        monkeypatch.setattr(chunkwise_module, 'SCAN_MIN_CHUNKS', 2)
    return request.param


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('n', SEQ_LENS)
def test_chunkwise_float64_is_exact(n, reverse, state_scheme):
    """Output and gradients; the reverse cell (chunked from the sequence's end) against the flipped reference."""
    assert_close_to_reference('chunkwise', n, 12, torch.float64, CHUNKWISE_FLOAT64_TOLERANCE, reverse=reverse)


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('chunk_size', [16, 37, 64, 256])
def test_chunkwise_padding_does_not_change_results(chunk_size, reverse, state_scheme):
    """N=200 runs as 13 x 16 and 6 x 34 steps (padded: at the end, or in front in reverse), 4 x 50 and one chunk;
    all give the reference result. Input gates below -5: a padded step's (pre-activations 0) would be the max
    stabiliser of the real steps before it if the cell saw it, and move their outputs by about eps."""
    q, k, v, igate, fgate, _ = make_inputs(200, 12, torch.float64, seed=1)
    inputs = q, k, v, igate - 5 - igate.abs(), fgate
    expected = directed_reference(inputs, reverse)
    actual = mlstm_chunkwise(*inputs, chunk_size=chunk_size, reverse=reverse)
    assert (actual - expected).abs().max() <= CHUNKWISE_FLOAT64_TOLERANCE * expected.abs().max()


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('n', [15, 200, 1024])
def test_chunkwise_without_autograd_is_exact(n, reverse, state_scheme):
    """Under no_grad the cell updates its large intermediates in place and the scan writes every chunk's state into
    one buffer: the same result. N=1024 in chunks of 16: 64 chunks."""
    inputs = [x.requires_grad_() for x in make_inputs(n, 12, torch.float64, seed=3)[:5]]
    expected = directed_reference(inputs, reverse)
    with torch.no_grad():
        actual = mlstm_chunkwise(*inputs, chunk_size=16, reverse=reverse)
    assert (actual - expected).abs().max() <= CHUNKWISE_FLOAT64_TOLERANCE * expected.abs().max()


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_chunkwise_gradcheck(reverse, state_scheme):
    """Finite differences of the float64 cell over three chunks of 4 steps, the one run last padded (N=10)."""
    *inputs, _ = make_inputs(10, 3, torch.float64, seed=2, batch=1, heads=2)
    cell = functools.partial(mlstm_chunkwise, chunk_size=4, reverse=reverse)
    assert torch.autograd.gradcheck(cell, [x.requires_grad_() for x in inputs])


class _SubnormalOperands(TorchDispatchMode):
    """Counts the subnormal numbers in the operands of the matmuls in its scope."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ('bmm', 'mm', 'baddbmm', 'addmm'):
            for x in args:
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    self.count += int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_chunkwise_matmuls_get_no_subnormal_numbers(reverse, state_scheme):
    """Forget gates of about e^-1 per step decay the state's weights by e^-16 per chunk of 16: chunks 6 apart weigh
    about e^-93, a subnormal float32, which slows the CPU's matmuls many times over. They are flushed to zero, and the
    result stays exact."""
    q, k, v, igate, _, _ = make_inputs(256, 8, torch.float64, seed=0)
    fgate = torch.full_like(igate, -0.5)
    expected = directed_reference((q, k, v, igate, fgate), reverse)
    with _SubnormalOperands() as subnormals:
        actual = mlstm_chunkwise(*(x.float() for x in (q, k, v, igate, fgate)), chunk_size=16, reverse=reverse)
    assert subnormals.count == 0
    assert (actual - expected).abs().max() <= TOLERANCES[torch.float32] * expected.abs().max()


def test_chunkwise_traced_graph_holds_for_other_lengths(monkeypatch):
    """A graph traced as the ONNX exporter traces it (torch.export, dynamic length; the exporter drops the size
    assertions it records) computes the cell at other lengths: other numbers of chunks, padding and chunk lengths,
    and no scan (a loop over the traced number of chunks) even above ``SCAN_MIN_CHUNKS``."""
    monkeypatch.setattr(chunkwise_module, 'SCAN_MIN_CHUNKS', 2)

    class Cell(torch.nn.Module):
        def forward(self, q, k, v, igate, fgate):
            return mlstm_chunkwise(q, k, v, igate, fgate, chunk_size=16, reverse=True)

    length = torch.export.Dim('length', min=2)
    with torch.no_grad():
        program = torch.export.export(Cell(), tuple(make_inputs(101, 8, torch.float64, seed=4)[:5]), strict=False,
                                      dynamic_shapes=[{2: length}] * 5,
                                      prefer_deferred_runtime_asserts_over_guards=True)
        for n in (3, 16, 40, 250):
            inputs = make_inputs(n, 8, torch.float64, seed=5)[:5]
            expected = directed_reference(inputs, reverse=True)
            actual = program.module()(*inputs)
            assert (actual - expected).abs().max() <= CHUNKWISE_FLOAT64_TOLERANCE * expected.abs().max(), n


class _LargeMoves(TorchDispatchMode):
    """The data-moving ops (copies, casts, pads, flips, ...) in its scope whose output has ``size`` or more elements."""
    MOVES = {'flip', 'clone', 'copy_', '_to_copy', 'constant_pad_nd', 'cat', 'stack', 'roll', 'index', 'gather',
             'index_select', 'slice_scatter', 'as_strided_scatter'}

    def __init__(self, size):
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.MOVES and any(isinstance(x, torch.Tensor) and x.numel() >= self.size
                                      for x in pytree.tree_leaves(out)):
            self.ops.append(name)
        return out


@pytest.mark.parametrize('n', [201, 256], ids=['padded', 'whole-chunks'])
def test_chunkwise_copies_mixer_views_once(n):
    """On the mixer's strided float32 views, q, k and v are moved once each, into the chunk layout (a pad, or a
    reshape's copy), and h not at all, in both directions: the reverse cell flips no tensor of their size (only gate
    vectors) and moves in its backward the same large tensors as the causal one."""
    inputs = [x.float() for x in make_inputs(n, 8, torch.float64, seed=0)[:5]]
    moves = {}
    for reverse in (False, True):
        views = mixer_views(inputs)
        with _LargeMoves(views[0].numel()) as forward:
            h = mlstm_chunkwise(*views, reverse=reverse)
        with _LargeMoves(views[0].numel()) as backward:
            torch.autograd.grad(h, views, torch.ones_like(h))
        moves[reverse] = forward.ops, backward.ops
    assert moves[False][0] == moves[True][0] == ['constant_pad_nd' if n % 64 else 'clone'] * 3
    assert moves[True][1] == moves[False][1] and 'flip' not in moves[True][1]


def test_unknown_backend_is_rejected():
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match='Unknown mLSTM backend'):
        mlstm(q, q, q, q[..., 0], q[..., 0], backend='nope')


# ---------------------------------------------------------------------------------------------- fused Triton kernels
def _fused_device():
    """'cuda', 'cpu' (kernels interpreted) or None where the fused kernels cannot run in this process."""
    if 'fused' not in MLSTM_BACKENDS:
        return None
    if torch.cuda.is_available():
        return 'cuda'
    from mmseg_vil.models.layers.mlstm.fused import _kernels_interpreted
    return 'cpu' if _kernels_interpreted() else None


FUSED_DEVICE = _fused_device()
needs_fused = pytest.mark.skipif(FUSED_DEVICE is None, reason='fused kernels need CUDA or TRITON_INTERPRET=1')

# The interpreter is slow: every sequence length once, every head dim and dtype at some lengths.
FUSED_CASES = [(1, 8, torch.float32), (15, 12, torch.float32), (64, 8, torch.float32), (196, 96, torch.float32),
               (200, 12, torch.float32), (1024, 8, torch.float32), (64, 12, torch.bfloat16),
               (200, 12, torch.bfloat16)]


# The head dims of the presets (ViL-T/S/B: 96/192/384, tests/data/spec_excerpts.md §4) in the CUDA launch
# configurations, whatever the device: one for half precision, float32 up to DH=128 and float32 above (owning 64,
# 64 and 32 rows). N spans two owned tiles of each and ends inside one; a single head keeps the interpreter fast.
FUSED_PRESET_CASES = [(72, 96, torch.float32), (40, 192, torch.float32), (33, 384, torch.float32),
                      (72, 96, torch.bfloat16), (72, 192, torch.bfloat16), (72, 384, torch.bfloat16)]


@needs_fused
@pytest.mark.parametrize('n,head_dim,dtype', FUSED_CASES)
def test_fused_backend_matches_reference(n, head_dim, dtype):
    assert_close_to_reference('fused', n, head_dim, dtype, TOLERANCES[dtype], device=FUSED_DEVICE)


@needs_fused
@pytest.mark.parametrize('n,head_dim,dtype', FUSED_PRESET_CASES)
def test_fused_backend_matches_reference_at_preset_head_dims_in_cuda_configs(n, head_dim, dtype):
    from mmseg_vil.models.layers.mlstm import fused
    with fused.cuda_launch_configs():
        assert 'num_warps' in fused._launch_config(head_dim, dtype)  # a CUDA configuration, also when interpreted
        assert_close_to_reference('fused', n, head_dim, dtype, TOLERANCES[dtype], device=FUSED_DEVICE, batch=1,
                                  heads=1)


# Head dims as the tile kernel splits them (fused._head_split): one chunk and a tail (40 = 32 + 8 in a tail of 16,
# 48 = 32 + 16, 96 = 64 + 32, 192 = 128 + 64) or one chunk (64). In the half-precision configurations dk and dv
# come from one launch (here at every head dim), in the float32 ones from two; float64 inputs run in both, so that
# both forms are held to float64's tolerance.
SPLIT_HEAD_DIM_CASES = [(torch.float64, torch.bfloat16), (torch.float64, torch.float32),
                        (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]


@needs_fused
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('head_dim', [40, 48, 64, 96, 192])
@pytest.mark.parametrize('dtype,config_dtype', SPLIT_HEAD_DIM_CASES,
                         ids=['float64-half-configs', 'float64', 'float32', 'bfloat16'])
def test_fused_backend_matches_reference_at_split_head_dims_in_cuda_configs(dtype, config_dtype, head_dim, reverse,
                                                                            monkeypatch):
    """N=72 spans two owned tiles, one partial (first in the query-major walks, last in the key-major ones), and
    several loop tiles; under the interpreter every access is bounds-checked and every tl.dot held to the sizes
    Triton 3.6 compiles (tests/triton_bounds.py)."""
    from mmseg_vil.models.layers.mlstm import fused
    if FUSED_DEVICE == 'cpu':
        from triton_bounds import checked_accesses
    elif dtype == torch.float64 and config_dtype != dtype and head_dim > 128:
        pytest.skip('float64 tiles of the half-precision configuration exceed the shared memory of a GPU above '
                    'DH=128 (300 KB on an H200); the interpreter runs them')
    launch_config = fused._launch_config
    one_key_launch = config_dtype == torch.bfloat16
    monkeypatch.setattr(fused, '_launch_config',
                        lambda dim, _: dict(launch_config(dim, config_dtype), FUSE_DK_DV=one_key_launch))
    with fused.cuda_launch_configs(), checked_accesses() if FUSED_DEVICE == 'cpu' else contextlib.nullcontext():
        assert fused._fuses_dk_dv(head_dim, dtype) == one_key_launch
        assert_close_to_reference('fused', 72, head_dim, dtype, TOLERANCES[dtype], device=FUSED_DEVICE, batch=1,
                                  heads=2, reverse=reverse)


@needs_fused
def test_fused_backend_matches_reference_with_large_input_gates():
    assert_close_to_reference('fused', 200, 12, torch.float32, TOLERANCES[torch.float32], device=FUSED_DEVICE,
                              large_input_gates=True)


def mixer_views(inputs):
    """q, k, v, igate, fgate as the ViL mixer passes them (``MLSTMMixer.forward``): head views of one
    ``(B, N, 3 NH DH)`` projection output and the halves of one ``(B, 2 NH, N)`` gate tensor, with the same values
    as ``inputs``. Both buffers require grad, so gradients can be taken with respect to the views."""
    q, k, v, igate, fgate = inputs
    heads, head_dim = q.shape[1], q.shape[-1]
    qkv = torch.cat([x.transpose(1, 2).flatten(2) for x in (q, k, v)], -1).requires_grad_()
    gates = torch.cat([igate, fgate], 1).requires_grad_()
    views = [*(x.unflatten(-1, (heads, head_dim)).transpose(1, 2) for x in qkv.chunk(3, -1)), *gates.chunk(2, 1)]
    assert not any(x.is_contiguous() for x in views)
    return views


# (N, head dim, dtype, CUDA launch configurations). In the interpreter's tiles N=150 spans two owned tiles, three
# loop tiles and three scan blocks, the last of each partial; the ViL-T head dim also in the CUDA tiles, in float32
# and in bfloat16 (the training dtype).
FUSED_VIEW_CASES = [(150, 12, torch.float64, False), (150, 12, torch.float32, False), (72, 96, torch.float32, True),
                    (72, 96, torch.bfloat16, True)]


@needs_fused
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('n,head_dim,dtype,cuda_configs', FUSED_VIEW_CASES,
                         ids=['float64', 'float32', 'float32-dh96-cuda-tiles', 'bfloat16-dh96-cuda-tiles'])
def test_fused_kernels_read_mixer_views_in_both_directions(n, head_dim, dtype, cuda_configs, reverse):
    """Output and the gradients of all five inputs given as the mixer's strided views (and a head-major output
    gradient, which the op sees transposed) equal the reference, causally and anti-causally. h and dq, dk, dv are
    views of token-major buffers, the layout the mixer's output norm reads and its projection's gradient takes."""
    from mmseg_vil.models.layers.mlstm import fused
    inputs, grad_h, expected, expected_grads = reference_case(n, head_dim, dtype, reverse=reverse)
    views = mixer_views([x.to(FUSED_DEVICE, dtype) for x in inputs])
    with fused.cuda_launch_configs() if cuda_configs else contextlib.nullcontext():
        h = mlstm(*views, backend='fused', reverse=reverse)
        grads = torch.autograd.grad(h, views, grad_h.to(FUSED_DEVICE, dtype))
    assert all(x.transpose(1, 2).is_contiguous() for x in (h, *grads[:3]))
    errors = relative_errors(h, grads, expected, expected_grads)
    assert all(e <= TOLERANCES[dtype] for e in errors.values()), errors


@needs_fused
def test_fused_kernels_copy_nothing(monkeypatch):
    """The reversed cell on the mixer's views, forward and backward: every kernel reads q, k, v, the gates and the
    output gradient at the caller's addresses and strides (no contiguous or flipped copy inside the ops), and around
    the two custom ops only views are made (no copy, flip or cast of inputs, outputs or gradients)."""
    from mmseg_vil.models.layers.mlstm import fused
    launches = []
    for name in ('mlstm_stabiliser_kernel', 'mlstm_tile_kernel', 'mlstm_grad_prep_kernel', 'mlstm_gate_grad_kernel'):
        kernel = getattr(fused.kernels, name)

        def recording_run(*args, grid, warmup, kernel=kernel, name=name, **kwargs):
            launches.append((name, dict(zip(kernel.arg_names, args))))
            return type(kernel).run(kernel, *args, grid=grid, warmup=warmup, **kwargs)
        monkeypatch.setattr(kernel, 'run', recording_run)

    inputs, grad_h, _, _ = reference_case(20, 8, torch.float32)
    q, k, v, igate, fgate = mixer_views([x.to(FUSED_DEVICE, torch.float32) for x in inputs])
    grad_h = grad_h.to(FUSED_DEVICE, torch.float32)
    with OpLog() as log:
        h = mlstm(q, k, v, igate, fgate, backend='fused', reverse=True)
        torch.autograd.grad(h, [q, k, v, igate, fgate], grad_h)
    views_and_ops = {'aten.transpose.int', 'aten.detach.default', 'mmseg_vil.mlstm_fused_forward.default',
                     'mmseg_vil.mlstm_fused_backward.default'}
    assert set(log.ops) <= views_and_ops, sorted(set(log.ops) - views_and_ops)

    # The kernels' arguments that are the caller's tensors, launch by launch: forward, then backward (dq, then dk and
    # dv in one launch or two).
    caller = dict(q=q, k=k, v=v, igate=igate, fgate=fgate, grad_h=grad_h.transpose(1, 2))
    key_grads = [('mlstm_tile_kernel', dict(X='v', Z='q', X2='k', DOT_WITH='k'))] if fused._fuses_dk_dv(
        8, torch.float32) else [('mlstm_tile_kernel', dict(X='v', Z='q', DOT_WITH='k')),
                                ('mlstm_tile_kernel', dict(X='k', Y='q'))]
    expected_reads = [('mlstm_stabiliser_kernel', dict(IGATE='igate', FGATE='fgate')),
                      ('mlstm_tile_kernel', dict(X='q', Y='k', Z='v')),
                      ('mlstm_grad_prep_kernel', dict(GRAD_H='grad_h')),
                      ('mlstm_tile_kernel', dict(Y='v', Z='k', DOT_WITH='q')),
                      *key_grads,
                      ('mlstm_gate_grad_kernel', dict(FGATE='fgate'))]
    assert [name for name, _ in launches] == [name for name, _ in expected_reads]
    for (name, args), (_, reads) in zip(launches, expected_reads):
        for arg, tensor in reads.items():
            assert (args[arg].data_ptr(), args[arg].stride()) == (caller[tensor].data_ptr(), caller[tensor].stride()), \
                f'{name} reads a copy of {tensor} as {arg}'


@needs_fused
def test_fused_kernels_take_expanded_output_gradient():
    """The gradient of h.sum() reaches the backward expanded (all strides 0): read through those strides."""
    inputs, _, expected, _ = reference_case(20, 8, torch.float64, reverse=True)
    inputs = [x.requires_grad_() for x in inputs]
    expected_grads = torch.autograd.grad(directed_reference(inputs, True).sum(), inputs)
    actual_inputs = [x.detach().to(FUSED_DEVICE).requires_grad_() for x in inputs]
    actual = mlstm(*actual_inputs, backend='fused', reverse=True)
    errors = relative_errors(actual, torch.autograd.grad(actual.sum(), actual_inputs), expected, expected_grads)
    assert all(e <= TOLERANCES[torch.float64] for e in errors.values()), errors


@needs_fused
def test_fused_kernels_pass_opcheck():
    """torch.library.opcheck of both custom ops on the mixer's strided views, reversed: schema (outputs alias no input,
    nothing mutated), fake tensors (the same shapes, dtypes and strides as the real outputs), autograd registration
    and AOT dispatch with dynamic shapes."""
    from mmseg_vil.models.layers.mlstm import fused
    inputs, grad_h, _, _ = reference_case(20, 8, torch.float32, reverse=True)
    views = mixer_views([x.to(FUSED_DEVICE, torch.float32) for x in inputs])
    torch.library.opcheck(fused.fused_forward.op, (*views, EPS, True))
    with torch.no_grad():
        h, *stats = fused.fused_forward(*views, EPS, True)
    q, k, v, igate, fgate = (x.detach() for x in views)
    grad_h = grad_h.to(FUSED_DEVICE, torch.float32).transpose(1, 2)  # h's gradient, as the head-major output's
    torch.library.opcheck(fused.fused_backward.op, (grad_h, q, k, v, h, igate, fgate, *stats, EPS, True))


def test_triton_is_installed():
    """The fused backend must be tested, not skipped: Triton is part of the pinned stack (requirements/stack.txt)."""
    assert 'fused' in MLSTM_BACKENDS, \
        'Triton is not importable, so the fused mLSTM backend and its tests are missing: pip install -r ' \
        'requirements/stack.txt (it pins the triton that torch installs)'


@pytest.mark.skipif(FUSED_DEVICE is not None, reason='the fused kernels run in this process')
def test_fused_backend_on_cpu_without_interpreter_raises():
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET'):
        mlstm(q, q, q, q[..., 0], q[..., 0], backend='fused')


@pytest.mark.skipif(FUSED_DEVICE is not None, reason='the fused tests run in this process')
def test_fused_backend_under_triton_interpreter():
    """Every test_fused_backend_matches_reference*, test_fused_kernels_* and fused test_backbone_* test, interpreted;
    none may be skipped. (The other backends' backbone tests run in this process; interpreted they only repeat the
    mixer kernels the fused cases run, at half a minute each.)"""
    interpreted_runs.check('test_fused_backend_under_triton_interpreter')


# ---------------------------------------------------------------------------------------------- whole backbone
@pytest.mark.parametrize('backend', ['chunkwise', 'auto', 'fused', 'fused_chunkwise'])
def test_backbone_features_agree_across_backends(backend):
    if backend.startswith('fused') and FUSED_DEVICE is None:
        pytest.skip('fused kernels need CUDA or TRITON_INTERPRET=1')
    if backend == 'fused_chunkwise' and FUSED_DEVICE == 'cuda':
        from mmseg_vil.models.layers.mlstm.fused_chunkwise.op import cuda_allowed
        if not cuda_allowed(torch.float32):
            pytest.skip('fused_chunkwise refuses float32 CUDA tensors (benchmarks/RESULTS.md)')
    from mmseg_vil.models.backbones.vil import ViL
    device = FUSED_DEVICE or 'cpu'
    torch.manual_seed(0)
    reference = ViL(arch=dict(embed_dims=32, num_layers=4), img_size=(64, 72), patch_size=8, out_indices=(1, 3),
                    mlstm_backend='parallel').to(device).eval()
    candidate = ViL(arch=dict(embed_dims=32, num_layers=4), img_size=(64, 72), patch_size=8, out_indices=(1, 3),
                    mlstm_backend=backend).to(device).eval()
    candidate.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 72, device=device)  # 72 tokens: not a multiple of any chunk or tile size
    for ours, expected in zip(candidate(x), reference(x)):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('backend', ['parallel', 'chunkwise', 'fused'])
def test_backbone_compiles_without_graph_breaks(backend):
    """fullgraph=True turns any graph break into an error; the fused kernels are opaque custom ops to the compiler."""
    if backend == 'fused' and FUSED_DEVICE is None:
        pytest.skip('fused kernels need CUDA or TRITON_INTERPRET=1')
    from mmseg_vil.models.backbones.vil import ViL
    device = FUSED_DEVICE or 'cpu'
    model = ViL(arch=dict(embed_dims=32, num_layers=2), img_size=(32, 48), patch_size=8, out_indices=(1,),
                mlstm_backend=backend).to(device)
    x = torch.randn(2, 3, 32, 48, device=device)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    out = compiled(x)[0]
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)[0]
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected)
    for grad, param in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, param.grad)


@pytest.mark.skipif('fused' not in MLSTM_BACKENDS, reason='needs Triton')
@pytest.mark.parametrize('switch', ['1', None])
def test_auto_picks_the_chunkwise_kernels_for_long_half_precision_sequences_on_cuda(switch, monkeypatch):
    """On CUDA, 'auto' runs the chunkwise Triton cell from FUSED_CHUNKWISE_MIN_LEN steps in 16-bit, the quadratic one
    below and in float32 (also in a validation run, which lets the chunkwise cell take float32); elsewhere the torch
    backends."""
    from types import SimpleNamespace
    from mmseg_vil.models.layers.mlstm import FUSED_CHUNKWISE_MIN_LEN, resolve_backend
    from mmseg_vil.models.layers.mlstm.fused_chunkwise.op import CUDA_OVERRIDE_ENV
    if switch is None:
        monkeypatch.delenv(CUDA_OVERRIDE_ENV, raising=False)
    else:
        monkeypatch.setenv(CUDA_OVERRIDE_ENV, switch)

    def cell_input(n, dtype=torch.bfloat16, cuda=True):
        return SimpleNamespace(shape=(2, 4, n, 96), dtype=dtype, is_cuda=cuda)

    assert resolve_backend('auto', cell_input(FUSED_CHUNKWISE_MIN_LEN)) == 'fused_chunkwise'
    assert resolve_backend('auto', cell_input(4 * FUSED_CHUNKWISE_MIN_LEN, torch.float16)) == 'fused_chunkwise'
    assert resolve_backend('auto', cell_input(FUSED_CHUNKWISE_MIN_LEN - 1)) == 'fused'
    assert resolve_backend('auto', cell_input(FUSED_CHUNKWISE_MIN_LEN, torch.float32)) == 'fused'
    assert resolve_backend('auto', cell_input(FUSED_CHUNKWISE_MIN_LEN, torch.float32, cuda=False)) == 'chunkwise'
    assert resolve_backend('fused', cell_input(4 * FUSED_CHUNKWISE_MIN_LEN)) == 'fused'
