"""The blocks' LayerNorm kernels against PyTorch's LayerNorm: output in the compute dtype and every gradient.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` in a subprocess (set before they are decorated).
"""
import re

import interpreted_runs
import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.layers import norm_ops

KERNEL_DEVICE = None if norm_ops.ops is None else (
    'cuda' if torch.cuda.is_available() else 'cpu' if norm_ops.kernels_interpreted() else None)
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None, reason='norm kernels need CUDA or TRITON_INTERPRET=1')
TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
              torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


# (rows, dim): rows not a multiple of a program's tile, dims not powers of two; float64 checks the formulas, float32
# and a bf16 output the mixed-precision path; no bias as in the v1 models.
@needs_kernels
@pytest.mark.parametrize('shape,dtype,out_dtype,bias', [
    ((3, 37, 24), torch.float64, torch.float64, True), ((2, 300, 192), torch.float64, torch.float64, False),
    ((5, 11, 40), torch.float32, torch.float32, True), ((4, 45, 48), torch.float32, torch.bfloat16, True)],
    ids=str)
def test_layer_norm_kernels_match_torch(shape, dtype, out_dtype, bias):
    gen = torch.Generator().manual_seed(0)

    def leaf(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).to(
            KERNEL_DEVICE).requires_grad_()

    x, weight = leaf(*shape, scale=3, shift=1), leaf(shape[-1], shift=1)
    params = [weight, leaf(shape[-1])] if bias else [weight, None]
    ours = norm_ops.layer_norm(x, *params, 1e-5, out_dtype)
    expected = F.layer_norm(x, shape[-1:], *params, 1e-5).to(out_dtype)
    assert ours.dtype == out_dtype
    torch.testing.assert_close(ours, expected, **TOLERANCES[out_dtype])
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(out_dtype).to(KERNEL_DEVICE)
    inputs = [x] + [p for p in params if p is not None]
    for grad, exp in zip(torch.autograd.grad(ours, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        assert grad.dtype == exp.dtype
        torch.testing.assert_close(grad, exp, **TOLERANCES[dtype])


@needs_kernels
def test_layer_norm_op_registration():
    x = torch.randn(2, 5, 24, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    weight, bias = (torch.randn(24, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(norm_ops.ops.layer_norm.op, (x, weight, bias, 1e-5, torch.float64))


# A block's residual add fused with the next norm: the two ops' results bit for bit, except bfloat16 under the
# interpreter (it rounds toward zero where PyTorch rounds to even): within a unit in the last place of the largest
# element there.
@needs_kernels
@pytest.mark.parametrize('dtype,update_dtype,out_dtype', [
    (torch.float64, torch.float64, torch.float64), (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16)], ids=str)
def test_add_layer_norm_is_the_add_then_the_norm(dtype, update_dtype, out_dtype):
    gen = torch.Generator().manual_seed(0)

    def leaf(*size, dtype=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).to(
            KERNEL_DEVICE).requires_grad_()

    x, update = leaf(3, 37, 40, scale=3, shift=1), leaf(3, 37, 40, dtype=update_dtype)
    params = leaf(40, shift=1), leaf(40)
    ours = norm_ops.add_layer_norm(x, update, None, *params, 1e-5, out_dtype)
    summed = x + update
    expected = summed, norm_ops.layer_norm(summed, *params, 1e-5, out_dtype)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(KERNEL_DEVICE) for t in ours]
    inputs = [x, update, *params]
    exact = dtype != torch.bfloat16
    for got, want in zip([*ours, *torch.autograd.grad(ours, inputs, grads, retain_graph=True)],
                         [*expected, *torch.autograd.grad(expected, inputs, grads)]):
        assert got.dtype == want.dtype
        if exact and got.dtype != torch.bfloat16 or KERNEL_DEVICE == 'cuda':
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
    # the norm's output unused: the gradient of the add alone
    grad_x, grad_update = torch.autograd.grad(ours[0], [x, update], grads[0])
    assert torch.equal(grad_x, grads[0]) and torch.equal(grad_update, grads[0].to(update_dtype))


@needs_kernels
def test_add_layer_norm_op_registration():
    x, update = (torch.randn(2, 5, 24, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(24, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(norm_ops.ops.add_layer_norm.op, (x, update, weight, bias, 1e-5, torch.float64))


@needs_kernels
@pytest.mark.parametrize('with_cp', [False, True])
def test_backbone_with_residual_adds_in_the_norms_is_the_block_by_block_model(with_cp, monkeypatch):
    """The backbone leaves each block's residual add to the next norm kernel: outputs and gradients bit for bit those
    of the blocks run one by one (float64; outputs after blocks 1 and 3 of 4, drop path on)."""
    from mmseg_vil.models.backbones import vil
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=KERNEL_DEVICE)
    results = []
    for defer in (True, False):
        monkeypatch.setattr(vil, 'fuses_adds', lambda _, defer=defer: defer)
        torch.manual_seed(0)
        model = vil.ViL(arch=dict(embed_dims=24, num_layers=4), img_size=32, out_indices=(1, 3), with_cp=with_cp,
                        drop_path_rate=0.3, mlstm_backend='parallel').to(KERNEL_DEVICE, torch.float64).train()
        outs = model(x)
        sum(out.square().sum() for out in outs).backward()
        results.append([*outs, *(p.grad for p in model.parameters())])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.skipif(norm_ops.ops is None or norm_ops.kernels_interpreted(), reason='compiles with Triton for sm_90')
@pytest.mark.parametrize('dtype', ['fp64', 'fp32'])
def test_layer_norm_backward_compiles_without_fused_multiply_adds(dtype):
    """The backward adds the residual stream's gradient with its own rounding, as autograd sums two gradients (the
    bit-for-bit tests above): the GPU code of its launch (offline, for an H100) holds no contracted multiply-add."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = norm_ops.ops.kernels.layer_norm_backward_kernel
    pointers = ('X', 'W', 'MEAN', 'RSTD', 'GRAD_Y', 'GRAD_RES', 'GRAD_X', 'GRAD_UPDATE', 'PARTIAL')
    constexprs = dict(ADD_GRAD=True, STORE_UPDATE_GRAD=True, ACC=getattr(tl, f'float{dtype[2:]}'),
                      ROWS=8, BLOCK_D=256, TILES=norm_ops.ops.BACKWARD_TILES)
    signature = {**{name: f'*{dtype}' for name in pointers}, 'n_rows': 'i32', 'dim': 'i32',
                 **{name: 'constexpr' for name in constexprs}}
    options = dict(num_warps=4, **norm_ops.ops.BACKWARD_LAUNCH)
    ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                         target=GPUTarget('cuda', 90, 32), options=options).asm['ptx']
    assert re.search(rf'\bmul\.rn\.f{dtype[2:]}', ptx) and not re.search(r'\bfma\.', ptx)


def test_layer_norm_without_kernels_is_torchs_in_the_compute_dtype():
    x = torch.randn(2, 5, 24)
    weight, bias = torch.randn(24), torch.randn(24)
    expected = F.layer_norm(x, (24,), weight, bias, 1e-6)
    if KERNEL_DEVICE != 'cpu':  # the CPU path is PyTorch's unless the kernels are interpreted
        assert torch.equal(norm_ops.layer_norm(x, weight, bias, 1e-6, torch.float32), expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert norm_ops.compute_dtype(x) == torch.bfloat16
    assert norm_ops.compute_dtype(x) == torch.float32


@pytest.mark.skipif(KERNEL_DEVICE is not None or norm_ops.ops is None, reason='the kernel tests run in this process')
def test_layer_norm_kernels_under_triton_interpreter():
    interpreted_runs.check('test_layer_norm_kernels_under_triton_interpreter')
