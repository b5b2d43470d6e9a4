"""The chunked selective scan against the sequential float64 recurrence of vim_spec §4 (tests/data/spec_excerpts.md),
values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.layers.selective_scan import linear_recurrence, selective_scan

CHUNK = 8
BATCH, DIM, STATE = 2, 6, 4


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Token-by-token float64 reference of :func:`selective_scan`."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double().unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        drive = (delta[..., t] * u[..., t]).unsqueeze(-1) * B[:, None, :, t]
        state = torch.exp(delta[..., t, None] * A) * state + drive
        ys.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double().unsqueeze(-1) * u
    return y if z is None else y * F.silu(z.double())


def make_inputs(length, seed=0, state_size=STATE):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(BATCH, DIM, length, generator=g),
        delta=torch.randn(BATCH, DIM, length, generator=g),
        A=-torch.exp(torch.randn(DIM, state_size, generator=g)),
        B=torch.randn(BATCH, state_size, length, generator=g),
        C=torch.randn(BATCH, state_size, length, generator=g),
        D=torch.randn(DIM, generator=g),
        z=torch.randn(BATCH, DIM, length, generator=g),
        delta_bias=torch.randn(DIM, generator=g),
    )


@pytest.mark.parametrize('length', [1, 5, CHUNK, 2 * CHUNK + 3, 6 * CHUNK])
def test_matches_sequential_float64(length):
    inputs = make_inputs(length)
    ours = selective_scan(**inputs, delta_softplus=True, chunk_size=CHUNK)
    assert ours.dtype == torch.float32 and ours.shape == (BATCH, DIM, length)
    torch.testing.assert_close(ours.double(), sequential_scan(**inputs, delta_softplus=True), atol=1e-5, rtol=1e-5)


def test_result_does_not_depend_on_chunk_size():
    inputs = make_inputs(37)
    whole = selective_scan(**inputs, delta_softplus=True, chunk_size=64)
    for chunk_size in (1, 3, 16):
        torch.testing.assert_close(selective_scan(**inputs, delta_softplus=True, chunk_size=chunk_size), whole,
                                   atol=1e-5, rtol=1e-5)


def test_bare_recurrence_without_optional_terms():
    """Without D, z, bias and softplus, ``delta`` is used as given (here positive, as step sizes are)."""
    inputs = {k: make_inputs(11)[k] for k in ('u', 'delta', 'A', 'B', 'C')}
    inputs['delta'] = inputs['delta'].abs()
    torch.testing.assert_close(selective_scan(**inputs, chunk_size=CHUNK).double(), sequential_scan(**inputs),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('length', [7, 2 * CHUNK + 1])
def test_gradients_match_sequential_float64(length):
    inputs = make_inputs(length, seed=1)
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    reference = {k: v.double().requires_grad_() for k, v in inputs.items()}
    weight = torch.randn(BATCH, DIM, length, generator=torch.Generator().manual_seed(2))
    (selective_scan(**ours, delta_softplus=True, chunk_size=CHUNK) * weight).sum().backward()
    (sequential_scan(**reference, delta_softplus=True) * weight.double()).sum().backward()
    for name in inputs:
        torch.testing.assert_close(ours[name].grad.double(), reference[name].grad, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f'grad of {name}: {m}')


def test_autograd_memory_is_independent_of_state_size():
    """Autograd keeps O(batch * dim * length) for backward, not the (batch, dim, length, N) states of every chunk."""
    length, state_size = 64, 32
    inputs = {k: v.requires_grad_() for k, v in make_inputs(length, state_size=state_size).items()}
    saved_numel = 0

    def pack(tensor):
        nonlocal saved_numel
        saved_numel += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        selective_scan(**inputs, delta_softplus=True, chunk_size=16)
    assert saved_numel < BATCH * DIM * length * state_size


def test_linear_recurrence_matches_loop():
    g = torch.Generator().manual_seed(3)
    decay, drive = torch.rand(3, 13, 2, generator=g), torch.randn(3, 13, 2, generator=g)
    state, expected = torch.zeros(3, 2), []
    for t in range(13):
        state = decay[:, t] * state + drive[:, t]
        expected.append(state)
    torch.testing.assert_close(linear_recurrence(decay, drive), torch.stack(expected, dim=1))


def test_rejects_empty_chunks():
    with pytest.raises(ValueError, match='chunk_size.*got 0'):
        selective_scan(**make_inputs(4), chunk_size=0)


def test_autocast_keeps_the_scan_in_float32():
    inputs = make_inputs(2 * CHUNK + 3)
    expected = selective_scan(**inputs, delta_softplus=True, chunk_size=CHUNK)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours = selective_scan(**leaves, delta_softplus=True, chunk_size=CHUNK)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    ours.sum().backward()
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves.values())
