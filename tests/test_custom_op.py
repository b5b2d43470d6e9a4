"""The custom-op wrapper: eager calls run the function directly, everything that traces goes through the dispatcher,
and both give the same outputs and gradients."""
from typing import List, Tuple

import torch
from op_log import OpLog
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from mmseg_vil.models.layers.custom_op import custom_op

calls = {'body': 0}


@custom_op('mmseg_vil_test::scaled_pair')
def scaled_pair(x: Tensor, weight: Tensor, factor: float) -> List[Tensor]:
    """``[x * weight * factor, (x * weight).sum(-1)]``: a list output, one float argument."""
    calls['body'] += 1
    product = x * weight
    return [product * factor, product.sum(-1)]


@scaled_pair.register_fake
def _(x, weight, factor):
    return [torch.empty_like(x), x.new_empty(x.shape[:-1])]


def _pair_setup(ctx, inputs, output) -> None:
    x, weight, factor = inputs
    ctx.save_for_backward(x, weight)
    ctx.factor = factor


def _pair_backward(ctx, grads):
    x, weight = ctx.saved_tensors
    grad_scaled, grad_sum = grads
    grad_product = grad_scaled * ctx.factor + grad_sum[..., None]
    return grad_product * weight, (grad_product * x).sum(0), None


scaled_pair.register_autograd(_pair_backward, setup_context=_pair_setup)


@custom_op('mmseg_vil_test::split_square')
def split_square(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(x ** 2, x ** 3)``: a tuple output."""
    calls['body'] += 1
    return x * x, x * x * x


@split_square.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


def _square_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _square_backward(ctx, grad_square, grad_cube):
    x, = ctx.saved_tensors
    return 2 * x * grad_square + 3 * x * x * grad_cube


split_square.register_autograd(_square_backward, setup_context=_square_setup)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    return x, weight


def _outputs_and_grads(call, x, weight):
    scaled, summed = call(scaled_pair, x, weight, 0.5)
    square, cube = call(split_square, scaled)
    loss = (square * 1.5).sum() + cube.sum() + (summed ** 2).sum()
    return [scaled, summed, square, cube, *torch.autograd.grad(loss, (x, weight))], (scaled, square)


def test_eager_calls_run_directly_with_the_registered_gradients():
    x, weight = _inputs()
    direct, (scaled, square) = _outputs_and_grads(lambda op, *args: op(*args), x, weight)
    dispatched, (scaled_op, square_op) = _outputs_and_grads(lambda op, *args: op.op(*args), x, weight)
    assert type(scaled.grad_fn).__name__ == 'scaled_pair_eagerBackward'
    assert type(square.grad_fn).__name__ == 'split_square_eagerBackward'
    assert type(scaled_op.grad_fn).__name__.startswith('GeneratedBackwardFor_mmseg_vil_test_scaled_pair')
    for ours, theirs in zip(direct, dispatched):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a, b: scaled_pair(a, b, 0.5), (x, weight))


def test_keyword_arguments_go_through_the_op():
    x, weight = _inputs()
    scaled, _ = scaled_pair(x, weight, factor=0.5)
    assert type(scaled.grad_fn).__name__.startswith('GeneratedBackwardFor_mmseg_vil_test_scaled_pair')
    torch.testing.assert_close(scaled, scaled_pair(x, weight, 0.5)[0], rtol=0, atol=0)


def test_output_structure_without_autograd():
    x, weight = _inputs()
    with torch.no_grad():
        out = scaled_pair(x, weight, 2.0)
        pair = split_square(x)
    assert isinstance(out, list) and len(out) == 2 and out[0].grad_fn is None
    assert isinstance(pair, tuple) and len(pair) == 2


def test_fake_tensors_go_through_the_dispatcher():
    calls['body'] = 0
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 4))
        weight = mode.from_tensor(torch.randn(4))
        scaled, summed = scaled_pair(x, weight, 1.0)
    assert calls['body'] == 0  # the registered fake ran, not the function
    assert scaled.shape == (2, 4) and summed.shape == (2,)


def test_dispatch_modes_see_the_op():
    """Under a dispatch mode (a flop counter, a schema check) the call is one op, as torch.library registered it."""
    x, weight = (t.detach() for t in _inputs())
    with OpLog() as log:
        scaled_pair(x, weight, 1.0)
    assert log.ops == ['mmseg_vil_test.scaled_pair.default']


def test_compiled_calls_trace_the_op():
    x, weight = _inputs()
    eager, _ = _outputs_and_grads(lambda op, *args: op(*args), x, weight)
    compiled_pair = torch.compile(lambda a, b: scaled_pair(a, b, 0.5), backend='aot_eager', fullgraph=True)
    scaled, summed = compiled_pair(x, weight)
    torch.testing.assert_close(scaled, eager[0])
    torch.testing.assert_close(summed, eager[1])
    assert 'eager' not in type(scaled.grad_fn).__name__
