"""The chunkwise Triton mLSTM ('fused_chunkwise') computes the parallel cell's function and exact gradients.

Against the float64 formula of vil_spec.md §2.6 (``reference_float64`` of test_mlstm_backends.py, with its ViL-like
gates that exercise both normaliser branches): output and all five gradients, one and several chunks, a partial last
chunk, both directions, inputs read through the strides of a projection output, extreme gates, torch.compile, and
the GPU's head-dim blocks. On CPU the kernels run under ``TRITON_INTERPRET=1`` in a subprocess, which must report
every test passed (none skipped), and every kernel access is bounds-checked there (tests/triton_bounds.py); on CUDA
float32 inputs are refused, so the tests run in this process only with MMSEG_VIL_FUSED_CHUNKWISE_CUDA=1 (the GPU
validation run, every dtype). Sizes are small because the interpreter is slow.
"""
import contextlib
import functools
import re

import interpreted_runs
import pytest
import torch

from mmseg_vil.models.layers.mlstm import MLSTM_BACKENDS
from test_mlstm_backends import FUSED_DEVICE, TOLERANCES, make_inputs, reference_float64, relative_errors

if 'fused_chunkwise' in MLSTM_BACKENDS:
    import triton
    import triton.language as tl
    from triton_bounds import OutOfBoundsAccess, checked_accesses

    from mmseg_vil.models.layers.mlstm import fused, mlstm_fused_chunkwise
    from mmseg_vil.models.layers.mlstm.fused_chunkwise import forward as chunkwise_forward, op
    from mmseg_vil.models.layers.mlstm.fused_chunkwise.tiles import head_dim_block

# float32 is refused on CUDA (op.cuda_allowed): the tests run there in a validation run only.
KERNELS_RUN = FUSED_DEVICE == 'cpu' or (FUSED_DEVICE == 'cuda' and op.validation_run())
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason='fused_chunkwise runs under TRITON_INTERPRET=1 only, or '
                                   'on CUDA with MMSEG_VIL_FUSED_CHUNKWISE_CUDA=1')
needs_interpreter = pytest.mark.skipif(FUSED_DEVICE != 'cpu', reason='checks the Triton interpreter')
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.fixture(autouse=True)
def bounds_checked():
    """Under the interpreter every test here also checks each kernel access against the tensors of its launch, and
    each tl.dot against the operand sizes Triton 3.6 compiles (tests/triton_bounds.py): on CPU an access past a
    tensor goes unnoticed, on the GPU it is an illegal memory access."""
    if FUSED_DEVICE != 'cpu':
        yield
        return
    with checked_accesses():
        yield


@functools.lru_cache(maxsize=None)
def reference_case(n, head_dim, dtype, reverse=False, seed=0, gates='vil'):
    """Inputs (batch 1, 2 heads), output gradient, float64 reference output and gradients; ``reverse`` flips the
    token order around the reference, which is what the reversed cell must compute."""
    *inputs, grad_h = make_inputs(n, head_dim, dtype, seed, batch=1, heads=2)
    if gates == 'held':
        inputs[3], inputs[4] = (x.to(dtype).double() for x in held_gates(n, seed))
    elif gates != 'vil':
        inputs[3], inputs[4] = (x.to(dtype).double() for x in extreme_gates(n, seed, quiet=gates == 'moving'))
    inputs = [x.requires_grad_() for x in inputs]
    if reverse:
        expected = reference_float64(*(x.flip(-2 if x.dim() == 4 else -1) for x in inputs))[0].flip(-2)
    else:
        expected = reference_float64(*inputs)[0]
    expected_grads = torch.autograd.grad(expected, inputs, grad_h)
    return [x.detach() for x in inputs], grad_h, expected.detach(), expected_grads


def extreme_gates(n, seed, quiet=False):
    """Input gates of +-100 and forget gates from ~0 to ~1 (exp input gates of e^+-100); with ``quiet``, every third
    stretch of 24 steps has input gates ~ -100 and forget gates ~ 1 instead, so that m carries over whole chunks of 16
    (in both directions) as well as moving to later keys within them."""
    gen = torch.Generator().manual_seed(seed)
    igate = 100 * torch.randn(1, 2, n, generator=gen, dtype=F64).sign() + torch.randn(1, 2, n, generator=gen, dtype=F64)
    fgate = 60 * torch.rand(1, 2, n, generator=gen, dtype=F64) - 30
    if quiet:
        calm = torch.arange(n) // 24 % 3 == 1
        igate = torch.where(calm, igate.abs().neg(), igate)
        fgate = torch.where(calm, 20 + fgate / 30, fgate)
    return igate, fgate


def held_gates(n, seed):
    """Forget gates ~1 and input gates ~ -3 with spikes of 4 at step 5 and 6 at step 100 (per head): the argmax of m
    stays at a spike for many chunks, so the rows of many later chunks send their m-gradient to one key."""
    gen = torch.Generator().manual_seed(seed)
    igate = torch.randn(1, 2, n, generator=gen, dtype=F64) - 3
    igate[..., 5] = 4
    igate[..., 100] = 6
    return igate, 20 + torch.randn(1, 2, n, generator=gen, dtype=F64)


def chunkwise_errors(n, head_dim, dtype, chunk_size, reverse=False, gates='vil'):
    inputs, grad_h, expected, expected_grads = reference_case(n, head_dim, dtype, reverse, gates=gates)
    actual_inputs = [x.to(FUSED_DEVICE, dtype).requires_grad_() for x in inputs]
    actual = mlstm_fused_chunkwise(*actual_inputs, reverse=reverse, chunk_size=chunk_size)
    assert actual.dtype == dtype and actual.shape == expected.shape
    actual_grads = torch.autograd.grad(actual, actual_inputs, grad_h.to(FUSED_DEVICE, dtype))
    return relative_errors(actual, actual_grads, expected, expected_grads)


def assert_matches_reference(n, head_dim, dtype, chunk_size, reverse=False, gates='vil'):
    errors = chunkwise_errors(n, head_dim, dtype, chunk_size, reverse, gates)
    tolerance = TOLERANCES[dtype]
    assert all(e <= tolerance for e in errors.values()), \
        f'{dtype} N={n} DH={head_dim} chunk={chunk_size} reverse={reverse}: errors {errors} over {tolerance}'


# (N, head dim, dtype, chunk size): one chunk, exact multiples, a partial last chunk, many chunks.
CASES = [(1, 8, F64, 16), (15, 12, F64, 16), (64, 8, F64, 16), (65, 12, F64, 32), (130, 8, F64, 64),
         (200, 12, F64, 16), (15, 8, F32, 16), (65, 12, F32, 16), (130, 12, F32, 32), (200, 8, F32, 64),
         (130, 12, torch.bfloat16, 32),
         # the ViL-T/S/B head dims: on CUDA in 32- or 16-wide blocks, under the interpreter in 128-wide ones (one
         # masked block; a whole and a masked one; three whole ones)
         (40, 96, F64, 16), (24, 192, F32, 16), (20, 384, F32, 16)]


@needs_kernels
@pytest.mark.parametrize('n,head_dim,dtype,chunk_size', CASES)
def test_kernel_matches_reference(n, head_dim, dtype, chunk_size):
    assert_matches_reference(n, head_dim, dtype, chunk_size)


@needs_kernels
@pytest.mark.parametrize('dtype', [F64, F32])
def test_kernel_reverse_matches_flipped_reference(dtype):
    assert_matches_reference(130, 12, dtype, 32, reverse=True)


@needs_kernels
@pytest.mark.parametrize('dtype', [F64, F32])
def test_kernel_extreme_gates(dtype):
    """Input gates around +-100 and forget gates from -30 to 30: everything finite and equal to the reference (float32
    in the reversed direction, to cover both)."""
    assert_matches_reference(130, 8, dtype, 32, reverse=dtype == F32, gates='extreme')


@needs_kernels
@pytest.mark.parametrize('dtype', [F64, F32])
def test_kernel_max_moves_between_chunks(dtype):
    """Many chunks (a partial last one) with the extreme gates and quiet stretches, where m carries over whole chunks
    and also moves within them: equal to the reference (float32 in the reversed direction)."""
    assert_matches_reference(200, 8, dtype, 16, reverse=dtype == F32, gates='moving')


def chunk_states_reference(k, v, igate, fgate, chunk_size):
    """What ``forward.chunk_states`` stores, from the definitions of scans.py in float64 and in the global frame
    (F, M = cummax of i - F, the argmax ties to the later step as torch.cummax's), for flattened heads: per step the
    local cumsum b, mu = M + F before the chunk and the argmax; per chunk end m and its argmax; the states C, n after
    every chunk but the last."""
    k, v, igate, fgate = (x.flatten(0, 1).cpu().double() for x in (k, v, igate, fgate))
    n = igate.shape[-1]
    cum_log_f = torch.nn.functional.logsigmoid(fgate).cumsum(-1)
    run_max, argmax = torch.cummax(igate - cum_log_f, -1)
    starts = torch.arange(n) // chunk_size * chunk_size
    before = torch.where(starts > 0, cum_log_f[:, (starts - 1).clamp(min=0)], 0.0)  # F before the step's chunk
    ends = torch.arange(chunk_size - 1, n + chunk_size - 1, chunk_size).clamp(max=n - 1)
    weights = torch.exp((igate - cum_log_f)[:, None, :] - run_max[:, ends[:-1], None])
    weights = torch.where(torch.arange(n) <= ends[:-1, None], weights, 0.0)  # (heads, chunks - 1, N)
    return dict(cum=cum_log_f - before, row_log=run_max + before, argmax=argmax,
                chunk_max=run_max[:, ends] + cum_log_f[:, ends], chunk_argmax=argmax[:, ends],
                state_c=torch.einsum('hcs,hsk,hsv->hckv', weights, k, v),
                state_n=torch.einsum('hcs,hsk->hck', weights, k))


@needs_kernels
@pytest.mark.parametrize('n,head_dim,chunk_size,reverse,cuda_tiles', [(200, 8, 16, False, False),
                                                                      (200, 40, 16, True, True)])
def test_kernel_chunk_states_match_definitions(n, head_dim, chunk_size, reverse, cuda_tiles, monkeypatch):
    """The chunk summaries and the scan over them (forward.chunk_states, parallel over chunks) store every per-step,
    per-chunk-end and state value of its definition, also where m carries over whole chunks (asserted below), with the
    GPU's tiles (several scan tiles, a masked last one) and the kernels' buffers NaN until written."""
    inputs, _, _, _ = reference_case(n, head_dim, F64, gates='moving')
    k, v, igate, fgate = (x.flip(-2 if x.dim() == 4 else -1) if reverse else x for x in inputs[1:])
    expected = chunk_states_reference(k, v, igate, fgate, chunk_size)
    fill_new_buffers(monkeypatch)
    with fused.cuda_launch_configs() if cuda_tiles else contextlib.nullcontext():
        actual = chunkwise_forward.chunk_states(*(x.to(FUSED_DEVICE) for x in inputs[1:]),
                                                op._config(head_dim, chunk_size, reverse, F64))
    actual = {name: x.cpu() for name, x in actual.items()}
    actual['state_c'], actual['state_n'] = actual['state_c'][:, :-1], actual['state_n'][:, :-1]  # last: never read
    for name in ('argmax', 'chunk_argmax'):
        assert torch.equal(actual[name].long(), expected[name]), name
    for name in ('cum', 'row_log', 'chunk_max', 'state_c', 'state_n'):
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-10, msg=name)
    starts = torch.arange(n) // chunk_size * chunk_size
    ends = torch.arange(chunk_size - 1, n + chunk_size - 1, chunk_size).clamp(max=n - 1)
    from_earlier = expected['chunk_argmax'] < starts[ends]
    assert from_earlier.any() and not from_earlier.all() and (expected['argmax'] < starts).sum() > from_earlier.sum()


@needs_kernels
@pytest.mark.parametrize('reverse', [False, True])
def test_kernel_reads_projection_layout(reverse):
    """q, k, v as head views of one (B, N, 3 NH DH) projection output and the gates as views of one (B, N, 2 NH)
    tensor are read in place; h is a transposed view of a token-major buffer, so flattening the heads back is free."""
    n, heads, head_dim = 65, 2, 8
    inputs, grad_h, expected, expected_grads = reference_case(n, head_dim, F64, reverse)
    projection = torch.cat([x.transpose(1, 2).flatten(2) for x in inputs[:3]], -1).to(FUSED_DEVICE).requires_grad_()
    gates = torch.cat([x.transpose(1, 2) for x in inputs[3:]], -1).to(FUSED_DEVICE).requires_grad_()
    q, k, v = (x.unflatten(-1, (heads, head_dim)).transpose(1, 2) for x in projection.chunk(3, -1))
    igate, fgate = gates.transpose(1, 2).chunk(2, dim=1)  # as the ViL block splits them
    assert not q.is_contiguous() and not igate.is_contiguous()

    h = mlstm_fused_chunkwise(q, k, v, igate, fgate, reverse=reverse, chunk_size=16)
    assert h.transpose(1, 2).is_contiguous()
    grad_projection, grad_gates = torch.autograd.grad(h, [projection, gates], grad_h.to(FUSED_DEVICE))
    actual_grads = [*(g.unflatten(-1, (heads, head_dim)).transpose(1, 2) for g in grad_projection.chunk(3, -1)),
                    *grad_gates.transpose(1, 2).chunk(2, dim=1)]
    errors = relative_errors(h, actual_grads, expected, expected_grads)
    assert all(e <= TOLERANCES[F64] for e in errors.values()), errors


@needs_kernels
def test_kernel_takes_expanded_output_gradient():
    """The gradient of h.sum() reaches the backward as an expanded tensor (all strides 0)."""
    inputs, _, expected, _ = reference_case(20, 8, F64)
    inputs = [x.requires_grad_() for x in inputs]
    expected_grads = torch.autograd.grad(reference_float64(*inputs)[0].sum(), inputs)
    actual_inputs = [x.detach().to(FUSED_DEVICE).requires_grad_() for x in inputs]
    actual = mlstm_fused_chunkwise(*actual_inputs, chunk_size=16)
    errors = relative_errors(actual, torch.autograd.grad(actual.sum(), actual_inputs), expected, expected_grads)
    assert all(e <= TOLERANCES[F64] for e in errors.values()), errors


@needs_kernels
def test_kernel_compiles_fullgraph_as_opaque_op():
    """fullgraph=True fails on any graph break; compiled forward and backward equal eager."""
    inputs, grad_h, _, _ = reference_case(40, 8, F32)
    inputs = [x.to(FUSED_DEVICE, F32).requires_grad_() for x in inputs]
    grad_h = grad_h.to(FUSED_DEVICE, F32)

    def loss(q, k, v, igate, fgate):
        return (mlstm_fused_chunkwise(q, k, v, igate, fgate, reverse=True, chunk_size=16) * grad_h).sum()

    compiled = torch.compile(loss, fullgraph=True, backend='aot_eager')
    actual = torch.autograd.grad(compiled(*inputs), inputs)
    expected = torch.autograd.grad(loss(*inputs), inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# The GPU's head-dim blocks (fused.cuda_launch_configs; the interpreter otherwise takes one block of up to 128):
# (N, head dim, dtype, chunk size, reverse). Three whole 32-wide half-precision blocks with a ragged last chunk;
# three 16-wide float32 blocks, reversed; N below one chunk with a head dim below 16 (one masked 16-wide block); a
# head dim that is no multiple of its block (40 = 32 + 8) and a last chunk of one step; the largest chunk with a last
# chunk of two steps; the default chunk in float32 with a whole and a masked block.
CUDA_TILE_CASES = [(40, 96, BF16, 16, False), (40, 48, F32, 16, True), (10, 12, F64, 16, False),
                   (65, 40, BF16, 32, False), (130, 8, F64, 64, False), (130, 40, F32, 64, True)]


def fill_new_buffers(monkeypatch):
    """torch.empty and torch.empty_like return NaN (floats) or -2^30 (integers): fresh CUDA memory holds garbage,
    fresh CPU memory often zeros, so without this a kernel reading an element that no kernel wrote could pass here."""
    def filled(allocate):
        def allocate_filled(*args, **kwargs):
            out = allocate(*args, **kwargs)
            return out.fill_(float('nan') if out.is_floating_point() else -2 ** 30)
        return allocate_filled
    for name in ('empty', 'empty_like'):
        monkeypatch.setattr(torch, name, filled(getattr(torch, name)))


@needs_kernels
@pytest.mark.parametrize('n,head_dim,dtype,chunk_size,reverse', CUDA_TILE_CASES)
def test_kernel_cuda_tiles_match_reference(n, head_dim, dtype, chunk_size, reverse, monkeypatch):
    """With the GPU's blocks, exact and in bounds (under the interpreter), with the kernels' buffers NaN until
    written."""
    reference_case(n, head_dim, dtype, reverse)  # computed before the allocations are filled
    fill_new_buffers(monkeypatch)
    with fused.cuda_launch_configs():
        assert op._config(head_dim, chunk_size, reverse, dtype)['BLOCK_D'] == head_dim_block(head_dim, dtype)
        assert_matches_reference(n, head_dim, dtype, chunk_size, reverse)


def chunkwise_outputs(n, head_dim, dtype, chunk_size, reverse):
    """Output and the five gradients of the kernels with the GPU's tiles."""
    inputs, grad_h, _, _ = reference_case(n, head_dim, dtype, reverse)
    inputs = [x.to(FUSED_DEVICE, dtype).requires_grad_() for x in inputs]
    with fused.cuda_launch_configs():
        h = mlstm_fused_chunkwise(*inputs, reverse=reverse, chunk_size=chunk_size)
        return [h.detach(), *torch.autograd.grad(h, inputs, grad_h.to(FUSED_DEVICE, dtype))]


# Launch options (op.LAUNCH_ENV) that keep every sum in its order, each against the defaults: dk and dv of a chunk in
# one program instead of two; other warps, pipeline stages and register caps (ignored by the interpreter; compiled on
# CUDA); the forward's scan over chunks in tiles of another size (elementwise).
SAME_ORDER_LAUNCHES = ['grad_key:SPLIT_DK_DV=0',
                       'grad_key:SPLIT_DK_DV=1,num_warps=4;output+grad_query:num_stages=3,maxnreg=80',
                       'scan:BLOCK_E=128,STAGES=2,num_warps=2']


@needs_kernels
@pytest.mark.parametrize('spec', SAME_ORDER_LAUNCHES)
@pytest.mark.parametrize('n,head_dim,dtype,chunk_size,reverse', [(40, 96, BF16, 16, False), (70, 48, F32, 16, True)])
def test_kernel_launch_options_keep_results(spec, n, head_dim, dtype, chunk_size, reverse, monkeypatch):
    """Bit for bit the defaults' output and gradients, with the GPU's tiles."""
    expected = chunkwise_outputs(n, head_dim, dtype, chunk_size, reverse)
    monkeypatch.setenv(op.LAUNCH_ENV, spec)
    actual = chunkwise_outputs(n, head_dim, dtype, chunk_size, reverse)
    for name, a, e in zip(('h', 'dq', 'dk', 'dv', 'digate', 'dfgate'), actual, expected):
        assert torch.equal(a, e), name


# Launch options that change the blocks of some sums: the state products' contraction as one tile of the whole head
# (padded to a power of two and loaded once per program) or as blocks of 64 (a whole and a masked one at DH=96),
# narrower head-dim blocks; dq in the grad-key kernel (from the transposed weighted gradient scores), in the dk
# program or in the one program of a chunk; the backward's scan in smaller tiles (the crossing sums in more parts).
OTHER_ORDER_LAUNCHES = ['output+grad_query+grad_key:STATE_BLOCK=128', 'output+grad_query+grad_key:STATE_BLOCK=64',
                        'output+grad_query+grad_key+summary+grad_summary:BLOCK_D=16;grad_key:SPLIT_DK_DV=0',
                        'grad_key:WITH_DQ=1', 'grad_key:WITH_DQ=1,SPLIT_DK_DV=0,STATE_BLOCK=128',
                        'scan+grad_scan:BLOCK_E=64,STAGES=2,num_warps=1']


@needs_kernels
@pytest.mark.parametrize('spec', OTHER_ORDER_LAUNCHES)
@pytest.mark.parametrize('n,head_dim,dtype,chunk_size,reverse', [(40, 96, BF16, 16, False), (70, 48, F32, 16, True)])
def test_kernel_launch_options_match_reference(spec, n, head_dim, dtype, chunk_size, reverse, monkeypatch):
    """Exact within the tolerances, with the GPU's tiles otherwise."""
    reference_case(n, head_dim, dtype, reverse)
    monkeypatch.setenv(op.LAUNCH_ENV, spec)
    with fused.cuda_launch_configs():
        assert_matches_reference(n, head_dim, dtype, chunk_size, reverse)


@needs_kernels
@pytest.mark.parametrize('dtype,gates', [(F64, 'held'), (F32, 'held'), (F64, 'moving')])
def test_kernel_later_chunks_in_small_blocks(dtype, gates, monkeypatch):
    """The grad-key kernel walks the later chunks' argmax targets in blocks of BLOCK_CHUNKS and stops after the first
    block that reaches past its chunk: with blocks of 2 chunks, where m's argmax stays in one chunk for 6 later
    chunks (several blocks, then later ones skipped), and where m carries over whole chunks and moves within them,
    exact."""
    reference_case(200, 8, dtype, gates=gates)
    monkeypatch.setenv(op.LAUNCH_ENV, 'grad_key:BLOCK_CHUNKS=2')
    assert_matches_reference(200, 8, dtype, 16, gates=gates)


@pytest.mark.skipif('fused_chunkwise' not in MLSTM_BACKENDS, reason='needs Triton')
def test_launch_overrides_parse():
    assert op.launch_overrides('grad_key:SPLIT_DK_DV=1,num_warps=4; output+grad_query:BLOCK_D=16;') == {
        'grad_key': {'SPLIT_DK_DV': 1, 'num_warps': 4}, 'output': {'BLOCK_D': 16}, 'grad_query': {'BLOCK_D': 16}}
    assert op.launch_overrides('') == {}
    with pytest.raises(ValueError, match='unknown kernel'):
        op.launch_overrides('grad_keys:num_warps=4')
    with pytest.raises(ValueError, match='kernel:NAME=INT'):
        op.launch_overrides('grad_key:num_warps=four')


@pytest.mark.skipif('fused_chunkwise' not in MLSTM_BACKENDS, reason='needs Triton')
def test_head_dim_blocks_fit_tl_dot():
    """Every head dim walks power-of-two blocks of 16 to 128, on CUDA and under the interpreter: tl.dot on the GPU's
    Triton 3.6 needs 16 (a head dim below 16 is one masked block)."""
    for head_dim in range(1, 513):
        for dtype in op.SUPPORTED_DTYPES:
            for interpreted in (False, True):
                block = head_dim_block(head_dim, dtype, interpreted)
                assert 16 <= block <= 128 and block & (block - 1) == 0, (head_dim, dtype, interpreted, block)


if 'fused_chunkwise' in MLSTM_BACKENDS:
    @triton.jit
    def shifted_copy_kernel(X, Y, n, LOAD_SHIFT: tl.constexpr, STORE_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """``Y[i + STORE_SHIFT] = X[i + LOAD_SHIFT]`` for i < n, in one block of which lanes n.. are masked off, plus
        a load of the block before X that only later programs would make (none in a one-program launch)."""
        offs = tl.arange(0, BLOCK)
        in_range = offs < n
        x = tl.load(X + offs + LOAD_SHIFT, mask=in_range)
        x += tl.load(X - BLOCK + offs, mask=in_range & (tl.program_id(0) > 0), other=0.0)
        tl.store(Y + offs + STORE_SHIFT, x, mask=in_range)

    @triton.jit
    def square_dot_kernel(X, Y, K: tl.constexpr):
        """``Y = X[:16, :K] @ X[:K, :16]`` with X read as a row-major (16, 16) matrix."""
        rows = tl.arange(0, 16)
        inner = tl.arange(0, K)
        a = tl.load(X + rows[:, None] * 16 + inner[None, :])
        b = tl.load(X + inner[:, None] * 16 + rows[None, :])
        tl.store(Y + rows[:, None] * 16 + rows[None, :], tl.dot(a, b))


@needs_interpreter
@pytest.mark.parametrize('load_shift,store_shift,access', [(1, 0, 'load'), (-1, 0, 'load'), (0, 1, 'store')])
def test_kernel_bounds_check_catches_a_shifted_access(load_shift, store_shift, access):
    """The harness's own mutation test: one element before or after a view, still inside its storage (where the
    interpreter reads and writes without complaint), is caught before it happens; masked-off lanes are not, even
    far outside."""
    source, target = torch.arange(32.), torch.zeros(32)
    x, y = source[8:18], target[8:18]
    with checked_accesses():
        shifted_copy_kernel[(1,)](x, y, 10, 0, 0, BLOCK=16)
        assert torch.equal(y, x)
        with pytest.raises(Exception) as error:
            shifted_copy_kernel[(1,)](x, y, 10, load_shift, store_shift, BLOCK=16)
    assert isinstance(error.value.__cause__, OutOfBoundsAccess)
    assert re.search(fr'{access} of 1 of 10 masked-on elements outside shifted_copy_kernel\.[XY] \(10 elements\)',
                     str(error.value.__cause__)), error.value.__cause__
    assert torch.equal(target[:8], torch.zeros(8)) and torch.equal(target[18:], torch.zeros(14))


@needs_interpreter
def test_kernel_dot_check_needs_16():
    """K = 8 runs under the bare interpreter, which would hide a tile that Triton 3.6 does not compile."""
    x, y = torch.randn(256), torch.empty(256)
    with checked_accesses():
        square_dot_kernel[(1,)](x, y, K=16)
        torch.testing.assert_close(y.view(16, 16), x.view(16, 16) @ x.view(16, 16))
        with pytest.raises(Exception, match='K >= 16'):
            square_dot_kernel[(1,)](x, y, K=8)


@pytest.mark.skipif('fused_chunkwise' not in MLSTM_BACKENDS, reason='needs Triton')
@pytest.mark.parametrize('chunk_size', [48, 128])  # 128: wrong bfloat16 results on the H100 (op.MAX_CHUNK_SIZE)
def test_invalid_chunk_size_is_rejected(chunk_size):
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match='chunk_size must be 16, 32 or 64'):
        mlstm_fused_chunkwise(q, q, q, q[..., 0], q[..., 0], chunk_size=chunk_size)


@pytest.mark.skipif('fused_chunkwise' not in MLSTM_BACKENDS or FUSED_DEVICE is not None,
                    reason='needs Triton, and the kernels not runnable in this process')
def test_cpu_without_interpreter_raises():
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET'):
        mlstm_fused_chunkwise(q, q, q, q[..., 0], q[..., 0])


@pytest.mark.skipif(FUSED_DEVICE != 'cuda' or KERNELS_RUN, reason='needs CUDA without MMSEG_VIL_FUSED_CHUNKWISE_CUDA')
def test_float32_refused_on_cuda_half_precision_taken():
    q = torch.zeros(1, 1, 4, 16, device='cuda')
    with pytest.raises(RuntimeError, match="float32 CUDA tensors.*autocast.*mlstm_backend='fused'"):
        mlstm_fused_chunkwise(q, q, q, q[..., 0], q[..., 0])
    q = q.to(torch.bfloat16)
    assert mlstm_fused_chunkwise(q, q, q, q[..., 0].float(), q[..., 0].float()).shape == q.shape


@pytest.mark.skipif('fused_chunkwise' not in MLSTM_BACKENDS, reason='needs Triton')
@pytest.mark.skipif(FUSED_DEVICE == 'cpu', reason='the kernel tests run in this process')
def test_kernels_under_triton_interpreter():
    interpreted_runs.check('test_kernels_under_triton_interpreter')
