"""The chunkwise cell without autograd (``mlstm/chunkwise_inference.py``): the parallel cell's function, in every
branch of its choice between the factorised form and the general cell.

The factorised form takes each chunk's scores relative to one reference per chunk and runs only where no query row's
range exceeds ``_RANGES``; where the decayed state outweighs the chunk's keys by more than the state lead, it scales
the chunk's scores; elsewhere (and from ``SCAN_MIN_CHUNKS`` chunks on) :func:`mlstm_chunkwise` runs its general form.
Each test checks which branch ran.
"""
import pytest
import torch
from test_mlstm_backends import CHUNKWISE_FLOAT64_TOLERANCE, TOLERANCES, directed_reference, make_inputs

import mmseg_vil.models.layers.mlstm.chunkwise_inference as inference
from mmseg_vil.models.layers.mlstm import mlstm
from mmseg_vil.models.layers.mlstm.chunkwise import mlstm_chunkwise


@pytest.fixture
def branches(monkeypatch):
    """The results of :func:`inference.cell` in the test's calls (``True``: factorised form; ``False``: the general
    cell ran)."""
    record = {'cell': []}
    cell = inference.cell

    def spy(*args, **kwargs):
        record['cell'].append(cell(*args, **kwargs))
        return record['cell'][-1]

    monkeypatch.setattr(inference, 'cell', spy)
    return record


def _error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize('cpu_kernels', ['1', '0'], ids=['kernels', 'pytorch'])
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('n,chunk_size', [(1, 64), (15, 64), (200, 16), (200, 37), (1024, 64), (1024, 16)])
def test_factorised_cell_is_exact_in_float64(n, chunk_size, reverse, cpu_kernels, branches, monkeypatch):
    """In the C++ cell where the kernels build, and in the PyTorch form."""
    monkeypatch.setenv('MMSEG_VIL_CPU_EXTENSION', cpu_kernels)
    inputs = make_inputs(n, 12, torch.float64, seed=7)[:5]
    with torch.no_grad():
        actual = mlstm_chunkwise(*inputs, chunk_size=chunk_size, reverse=reverse)
    assert branches['cell'] == [True]
    assert _error(actual, directed_reference(inputs, reverse)) <= CHUNKWISE_FLOAT64_TOLERANCE


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('large_input_gates', [False, True], ids=['vil-gates', 'large-input-gates'])
@pytest.mark.parametrize('cpu_kernels', ['1', '0'], ids=['kernels', 'pytorch'])
def test_factorised_cell_float32(reverse, large_input_gates, cpu_kernels, branches, monkeypatch):
    monkeypatch.setenv('MMSEG_VIL_CPU_EXTENSION', cpu_kernels)
    inputs = make_inputs(1024, 96, torch.float32, seed=8, batch=1, heads=4, large_input_gates=large_input_gates)[:5]
    with torch.inference_mode():
        actual = mlstm(*(x.float() for x in inputs), backend='chunkwise', reverse=reverse)
    assert actual.dtype == torch.float32 and branches['cell'] == [True]
    assert _error(actual, directed_reference(inputs, reverse)) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_rows_of_too_wide_range_run_the_general_cell(dtype, reverse, branches):
    """One key in the middle of a chunk outweighs the chunk's first one by e^700, more than the factorised form's
    ranges span in either dtype: the general cell runs."""
    q, k, v, igate, fgate, _ = make_inputs(128, 12, torch.float64, seed=9)
    igate[..., 100] += 700
    inputs = [x.to(dtype).double() for x in (q, k, v, igate, fgate)]
    with torch.no_grad():
        actual = mlstm_chunkwise(*(x.to(dtype) for x in inputs), chunk_size=64, reverse=reverse)
    assert branches['cell'] == [False]
    assert _error(actual, directed_reference(inputs, reverse)) <= TOLERANCES[dtype]


@pytest.mark.parametrize('cpu_kernels', ['1', '0'], ids=['kernels', 'pytorch'])
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_state_outweighing_the_chunks_keys_scales_their_scores(dtype, reverse, cpu_kernels, monkeypatch, branches):
    """The first chunk's keys (in the cell's direction) outweigh all later ones by e^800 and the forget gates keep
    them: later chunks take their scores relative to the state's max minus the state lead. (With the C++ kernels,
    where they build, the scores' pass scales them: only the result is checked.)"""
    from mmseg_vil.models.layers.cpu_kernels import usable
    monkeypatch.setenv('MMSEG_VIL_CPU_EXTENSION', cpu_kernels)
    scaled = []
    original = torch.Tensor.mul_

    q, k, v, igate, fgate, _ = make_inputs(192, 12, torch.float64, seed=10)
    first = slice(-64, None) if reverse else slice(0, 64)
    igate[..., first] += 400
    igate[..., slice(0, 128) if reverse else slice(64, None)] -= 400
    fgate = fgate.abs() + 30  # log sigmoid(30) = -1e-13: the state decays by nothing
    inputs = [x.to(dtype).double() for x in (q, k, v, igate, fgate)]  # the reference of the rounded gates

    def mul_(self, other):
        if self.dim() == 3 and isinstance(other, torch.Tensor) and other.shape == (self.shape[0], 1, 1):
            scaled.append(int((other < 1).sum()))
        return original(self, other)

    monkeypatch.setattr(torch.Tensor, 'mul_', mul_)
    with torch.no_grad():
        actual = mlstm_chunkwise(*(x.to(dtype) for x in inputs), chunk_size=64, reverse=reverse)
    # 2 later chunks of 2 x 2 sequences
    assert branches['cell'] == [True] and scaled == ([] if usable(q.to(dtype)) else [8])
    # float32 exponents of gates about 400 are off by about 3e-5 (the general cell's error here: up to 1e-4)
    tolerance = TOLERANCES[dtype] if dtype == torch.float64 else 1e-3
    assert _error(actual, directed_reference(inputs, reverse)) <= tolerance


def test_many_chunks_run_the_general_cell(branches, monkeypatch):
    """Without the C++ kernels (whose state recurrence has no such limit, tests/test_cpu_kernels.py)."""
    monkeypatch.setenv('MMSEG_VIL_CPU_EXTENSION', '0')
    inputs = make_inputs(100 * 4, 8, torch.float64, seed=11, batch=1, heads=1)[:5]
    with torch.no_grad():
        actual = mlstm_chunkwise(*inputs, chunk_size=4)
    assert branches['cell'] == [False]
    assert _error(actual, directed_reference(inputs, False)) <= CHUNKWISE_FLOAT64_TOLERANCE


def test_autograd_and_half_precision_run_the_general_cell(branches):
    inputs = [x.requires_grad_() for x in make_inputs(64, 8, torch.float64, seed=12)[:5]]
    mlstm_chunkwise(*inputs, chunk_size=16)
    with torch.no_grad():
        mlstm_chunkwise(*(x.bfloat16() for x in inputs), chunk_size=16)
    assert branches['cell'] == []


@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
@pytest.mark.parametrize('n', [200, 256], ids=['padded', 'whole-chunks'])
def test_layout_written_by_a_producer(n, reverse):
    """A producer writes q, k and v into :class:`inference.Layout`'s real steps; the cell writes h into a strided
    (token-major) output: the result of :func:`mlstm_chunkwise`."""
    q, k, v, igate, fgate, _ = make_inputs(n, 16, torch.float64, seed=13)
    layout = inference.Layout(*q.shape[:2], n, 16, 64, reverse, torch.float64, q.device)
    for buffer, x in zip(layout.real, (q, k, v)):
        buffer.copy_(x)
    out = torch.full((q.shape[0], n, q.shape[1], 16), float('nan'), dtype=torch.float64).transpose(1, 2)
    with torch.no_grad():
        assert inference.cell(*layout.qkv, igate, fgate, layout.length, reverse, out)
        expected = mlstm_chunkwise(q, k, v, igate, fgate, reverse=reverse)
    assert _error(out, expected) <= CHUNKWISE_FLOAT64_TOLERANCE
