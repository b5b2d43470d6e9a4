"""The restructured mixer (no token flips) computes the official flip formulation, in float64, forward and backward."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmseg_vil.models.layers.mlstm import MLSTM_BACKENDS, mlstm
from mmseg_vil.models.layers.mlstm.parallel import mlstm_parallel
from mmseg_vil.models.layers.vil_block import MLSTMMixer


def official_conv(mixer: MLSTMMixer, x_mlstm: torch.Tensor, grid) -> torch.Tensor:
    """The official conv of the (flipped) sequence: 3x3 on the image, or causal 1-D (pad k - 1, drop the tail)."""
    channels_first = x_mlstm.transpose(1, 2)
    if mixer.conv_kind == '2d':
        return mixer.conv(channels_first.unflatten(-1, grid)).flatten(2).transpose(1, 2)
    pad = mixer.conv.kernel_size[0] - 1
    return F.conv1d(channels_first, mixer.conv.weight, mixer.conv.bias, padding=pad, groups=mixer.inner_dims)[
        ..., :-pad].transpose(1, 2)


def official_mixer(mixer: MLSTMMixer, x: torch.Tensor, grid) -> torch.Tensor:
    """vil_spec.md §2.5 (tests/data/spec_excerpts.md) literally:
    flip, proj_up, conv of the (rotated) image, q/k/v, cat-gates, cell, flip back."""
    if mixer.reverse:
        x = x.flip(1)
    x_mlstm, z = mixer.proj_up(x).chunk(2, dim=-1)
    x_conv = F.silu(official_conv(mixer, x_mlstm, grid))
    q, k, v = mixer.q_proj(x_conv), mixer.k_proj(x_conv), mixer.v_proj(x_mlstm)
    gate_in = torch.cat([q, k, v], dim=-1)
    igate, fgate = mixer.igate(gate_in).transpose(1, 2), mixer.fgate(gate_in).transpose(1, 2)
    heads = [t.unflatten(-1, (mixer.num_heads, -1)).transpose(1, 2) for t in (q, k, v)]
    h = mlstm_parallel(*heads, igate, fgate)
    h = F.group_norm(h.transpose(1, 2).flatten(0, 1).flatten(1), mixer.num_heads, mixer.outnorm.weight,
                     mixer.outnorm.bias, eps=1e-5).unflatten(0, x.shape[:2])
    y = mixer.proj_down((h + mixer.learnable_skip * x_conv) * F.silu(z))
    return y.flip(1) if mixer.reverse else y


@pytest.mark.parametrize('options', [
    {}, dict(conv_kind='causal1d', conv_kernel_size=4, proj_bias=False, norm_bias=False),
    dict(conv_kind='causal1d', conv_kernel_size=3), dict(conv_kernel_size=5, proj_bias=False)])
@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('grid', [(3, 5), (4, 4)])
def test_mixer_equals_official_flip_formulation(reverse, grid, options):
    torch.manual_seed(0)
    mixer = MLSTMMixer(16, num_heads=2, reverse=reverse, mlstm_backend='parallel', **options).double()
    for param in mixer.parameters():  # random values everywhere, not the init's zeros and ones
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64, requires_grad=True)
    ours = mixer(x, grid)
    grads = torch.autograd.grad(ours.square().sum(), [x, *mixer.parameters()])
    expected = official_mixer(mixer, x, grid)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *mixer.parameters()])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-11)


def test_even_conv_kernel_is_refused():
    with pytest.raises(ValueError, match='conv_kernel_size=4 must be odd'):
        MLSTMMixer(16, conv_kernel_size=4)


@pytest.mark.parametrize('backend', sorted(set(MLSTM_BACKENDS) - {'fused', 'fused_chunkwise'}))
def test_reverse_equals_flipped_sequence(backend):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 70, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    igate = torch.randn(2, 2, 70, generator=gen, dtype=torch.float64, requires_grad=True)
    fgate = (3 + torch.randn(2, 2, 70, generator=gen, dtype=torch.float64)).requires_grad_()
    inputs = (q, k, v, igate, fgate)
    ours = mlstm(*inputs, backend=backend, reverse=True)
    expected = mlstm_parallel(*(x.flip(-2 if x.dim() == 4 else -1) for x in inputs)).flip(-2)
    grad_out = torch.randn_like(ours)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)
    for grad, expected_grad in zip(torch.autograd.grad(ours, inputs, grad_out),
                                   torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize('cpu_kernels', ['1', '0'], ids=['kernels', 'pytorch'])
@pytest.mark.parametrize('options', [
    {}, dict(conv_kind='causal1d', conv_kernel_size=4, proj_bias=False, norm_bias=False)])
@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('grid', [(9, 9), (16, 8)], ids=['padded', 'whole-chunks'])
def test_mixer_inference_path_equals_official_flip_formulation(reverse, grid, options, cpu_kernels, monkeypatch):
    """Without autograd on the CPU the chunkwise backend runs the mixer's inference path (q/k/v written into the
    cell's chunk layout; the C++ cell with the gated output as its epilogue where the kernels build, else the PyTorch
    form with the rows' factors applied by the output norm): the official function. 81 steps in chunks of 16
    (padded) or 128 in 8."""
    import mmseg_vil.models.layers.mlstm.chunkwise_inference as inference
    import mmseg_vil.models.layers.vil_block as vil_block
    from mmseg_vil.models.layers.cpu_kernels import ops, usable
    monkeypatch.setenv('MMSEG_VIL_CPU_EXTENSION', cpu_kernels)
    monkeypatch.setattr(vil_block, 'CHUNK_SIZE', 16)
    monkeypatch.setattr(inference, 'COMPILED_CHUNK_SIZE', 16)
    ran = []  # (function, whether it ran the factorised form)
    for name in ('cell_gated_output_', 'cell_unscaled'):
        def spy(*args, cell=getattr(inference, name), name=name):
            result = cell(*args)
            ran.append((name, result is not None and result is not False))
            return result

        monkeypatch.setattr(inference, name, spy)
    torch.manual_seed(0)
    mixer = MLSTMMixer(16, num_heads=2, reverse=reverse, mlstm_backend='chunkwise', **options).double()
    for param in mixer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    with torch.no_grad():
        ours = mixer(x, grid)
        expected = official_mixer(mixer, x, grid)
    compiled = usable(x) and ops().blas_found()  # the C++ cell, the gated output its epilogue
    assert ran == ([('cell_gated_output_', True)] if compiled else
                   [('cell_gated_output_', False), ('cell_unscaled', True)])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_block_inference_keeps_the_residual_stream_dtype_under_autocast():
    """Without autograd the block adds the residual into the mixer's output in place, except where autocast gives a
    16-bit mixer output: the stream stays float32 and equals the autograd path's."""
    from mmseg_vil.models.layers.vil_block import ViLBlock
    torch.manual_seed(0)
    block = ViLBlock(16, reverse=False, num_heads=2).eval()
    x = torch.randn(2, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected = block(x, (4, 4))
        with torch.no_grad():
            ours = block(x, (4, 4))
    assert ours.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(ours, expected.detach(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(block(x, (4, 4)), x + block.mixer(block.norm(x), (4, 4)), rtol=1e-6, atol=1e-6)
