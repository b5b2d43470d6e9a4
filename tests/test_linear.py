"""The up-projection's linear (bias gradient by a product with ones) against autograd of ``F.linear``."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.layers.linear import linear


def _inputs(dtype, gen):
    x = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(10, 12, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(10, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return x, weight, bias


def test_linear_matches_autograd_in_float64():
    gen = torch.Generator().manual_seed(0)
    inputs = _inputs(torch.float64, gen)
    grad_out = torch.randn(2, 7, 10, generator=gen, dtype=torch.float64)
    ours = linear(*inputs)
    expected = F.linear(*inputs)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    for grad, exp in zip(torch.autograd.grad(ours, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(grad, exp, rtol=1e-12, atol=1e-12)


def test_linear_under_autocast_keeps_dtypes_and_rounding():
    """bfloat16 autocast on the CPU: the same output, gradients in the inputs' dtypes, within bfloat16 rounding."""
    gen = torch.Generator().manual_seed(1)
    inputs = _inputs(torch.float32, gen)
    grad_out = torch.randn(2, 7, 10, generator=gen).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours = linear(*inputs)
        expected = F.linear(*inputs)
    assert ours.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(ours, inputs, grad_out)
    for grad, exp, tensor in zip(grads, torch.autograd.grad(expected, inputs, grad_out), inputs):
        assert grad.dtype == exp.dtype == tensor.dtype
        torch.testing.assert_close(grad, exp, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize('frozen', ['x', 'weight', 'bias'])
def test_linear_computes_only_the_gradients_asked_for(frozen):
    gen = torch.Generator().manual_seed(2)
    inputs = dict(zip(('x', 'weight', 'bias'), _inputs(torch.float64, gen)))
    inputs[frozen] = inputs[frozen].detach()
    out = linear(*inputs.values())
    trainable = [t for t in inputs.values() if t.requires_grad]
    expected = torch.autograd.grad(F.linear(*inputs.values()).sum(), trainable)
    for grad, exp in zip(torch.autograd.grad(out.sum(), trainable), expected):
        torch.testing.assert_close(grad, exp, rtol=1e-12, atol=1e-12)
