"""The chunkwise Triton mLSTM as torch.library custom ops with a registered autograd formula.

torch.compile (fullgraph too) then treats forward and backward as opaque calls: no graph break, and Inductor never
re-traces our kernels. A custom op must return fresh tensors, so the ops return the token-major ``(B, N, NH, DH)``
buffers and the Python wrappers turn them into the ``(B, NH, N, DH)`` views the callers expect.
"""
import os
from typing import Dict, List, Optional, Sequence

import torch
import triton
from torch import Tensor

from ...custom_op import custom_op
from ..fused import _cuda_configs, _dot_options, _kernels_interpreted
from . import backward as _backward_kernels
from . import forward as _forward_kernels
from .tiles import head_dim_block

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_CHUNK_SIZE = 64
# A chunk's (CHUNK, CHUNK) tiles live in registers. Chunks of 128 computed wrong bfloat16 results at DH=96 on the
# H100 (relative errors up to 18 in the gate gradients, from N=130; float32, DH=32 and the interpreter were exact;
# benchmarks/RESULTS.md, eighth session) and were no faster than 64, so they are not offered.
MAX_CHUNK_SIZE = 64
# float32 CUDA tensors are refused (:func:`cuda_allowed`). Setting this variable to 1 lifts the refusal for a GPU
# validation run, e.g. of tests/test_mlstm_fused_chunkwise.py, whose kernel tests then run on CUDA in every dtype;
# benchmarks/mlstm_kernel_check.py needs no variable: it calls mlstm_fused_chunkwise_kernels.
CUDA_OVERRIDE_ENV = 'MMSEG_VIL_FUSED_CHUNKWISE_CUDA'
# Launch options per kernel, for timing alternatives on a GPU without editing code (benchmarks/mlstm_kernel_check.py
# --chunkwise-sweep): groups ``kernel[+kernel...]:NAME=VALUE[,NAME=VALUE...]`` joined by ``;``, e.g.
# ``grad_key:SPLIT_DK_DV=1,num_warps=4;output+grad_query:num_stages=3``. Kernels: LAUNCH_KERNELS; names: the
# kernel's constexprs (BLOCK_D; STATE_BLOCK of output, grad_query and grad_key, tiles.py; SPLIT_DK_DV, WITH_DQ and
# BLOCK_CHUNKS of grad_key, backward.py; BLOCK_E, a power of two, and STAGES of the scans over chunks 'scan' and
# 'grad_scan', forward.scan_options), num_warps / num_stages and maxnreg (a register cap per thread for ptxas,
# e.g. 80: three programs of 8 warps per SM); integer values. Read at every call. Warps, stages, maxnreg and
# SPLIT_DK_DV (and the forward scan's BLOCK_E) keep every sum's order (bit-identical results); BLOCK_D, STATE_BLOCK,
# WITH_DQ, BLOCK_CHUNKS and the backward scan's BLOCK_E change blocks or orientations of sums, within the tests'
# tolerances.
LAUNCH_ENV = 'MMSEG_VIL_CHUNKWISE_LAUNCH'
LAUNCH_KERNELS = ('summary', 'scan', 'output', 'grad_prep', 'grad_summary', 'grad_scan', 'grad_query', 'grad_key')


def validation_run() -> bool:
    """Whether ``CUDA_OVERRIDE_ENV=1``: CUDA tensors of every dtype are taken (a GPU validation run)."""
    return os.environ.get(CUDA_OVERRIDE_ENV) == '1'


def cuda_allowed(dtype: torch.dtype) -> bool:
    """Whether :func:`mlstm_fused_chunkwise` takes CUDA tensors of ``dtype``: 16-bit and float64 ones (every kernel and
    backend test passed on the H100 and H200, 2026-12-07), float32 ones only in a :func:`validation_run`: there the
    3xTF32 products missed the official model's float32 block outputs by 1.3e-5 against the tests' 1e-5, in one
    element of 3072 (H200, 2026-12-07), so ``fused`` stays the float32 kernel on CUDA. With plain float32 products
    ('ieee', :func:`_config`) the same element missed by 1.4e-5 (H100, eighth session): the products are not the
    cause (the GPU's approximate float32 exp and division are the suspects), so the refusal stays."""
    return dtype != torch.float32 or validation_run()


def _config(head_dim: int, chunk_size: int, reverse: bool, dtype: torch.dtype) -> dict:
    """Compile-time parameters and warps of the per-chunk kernels of one call (warps of the summaries and scans:
    forward.py's SUMMARY_LAUNCH, SCAN_LAUNCH); the CUDA head-dim blocks also under the interpreter inside
    ``fused.cuda_launch_configs()``, for the tests.

    The ptxas report (benchmarks/kernel_resources.py --cell fused_chunkwise; sm_90, Triton 3.8, bf16) for the ViL
    head dims: at chunk 64 and 8 warps no spills, about 110-120 registers in the output, grad-query and grad-key
    kernels (two programs per SM; float32 140-240, one); at chunk 32 (4 warps) 70-93 registers, five to seven
    programs per SM (benchmarks/mlstm_kernel_check.py times chunk 32/64, and launch options: LAUNCH_ENV).
    """
    block_d = head_dim_block(head_dim, dtype, interpreted=not _cuda_configs())
    dots = _dot_options(dtype)
    if dtype == torch.float32:  # plain float32 products: auto never runs this cell in float32, so exactness first
        dots['DOT_PRECISION'] = 'ieee'
    return dict(HEAD_DIM=head_dim, CHUNK=chunk_size, BLOCK_D=block_d, REVERSE=reverse,
                num_warps=8 if chunk_size >= 64 else 4, num_stages=2, **dots, overrides=launch_overrides())


def launch_overrides(spec: Optional[str] = None) -> Dict[str, Dict[str, int]]:
    """``{kernel: {name: value}}`` from ``spec`` (the format of LAUNCH_ENV), by default that variable's value."""
    spec = os.environ.get(LAUNCH_ENV, '') if spec is None else spec
    overrides: Dict[str, Dict[str, int]] = {}
    for group in filter(None, (part.strip() for part in spec.split(';'))):
        kernels, _, settings = group.partition(':')
        try:
            values = {name.strip(): int(value) for name, value in
                      (item.split('=') for item in settings.split(',') if item.strip())}
        except ValueError:
            raise ValueError(f'{LAUNCH_ENV}: {group!r} is not kernel:NAME=INT[,NAME=INT...]') from None
        for kernel in kernels.split('+'):
            if kernel.strip() not in LAUNCH_KERNELS:
                raise ValueError(f'{LAUNCH_ENV}: unknown kernel {kernel!r} in {group!r}; kernels: {LAUNCH_KERNELS}')
            overrides.setdefault(kernel.strip(), {}).update(values)
    return overrides


@custom_op('mmseg_vil::mlstm_fused_chunkwise_forward')
def _forward(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float, chunk_size: int,
             reverse: bool) -> List[Tensor]:
    """``[h (B, N, NH, DH), row sums (B*NH, N), *chunk states (forward.STATE_NAMES)]``."""
    return forward_kernels(q, k, v, igate, fgate, eps, chunk_size, reverse)


@_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float, chunk_size: int,
      reverse: bool) -> List[Tensor]:
    batch, heads, n, head_dim = q.shape
    return [q.new_empty(batch, n, heads, head_dim), *empty_stats(q, chunk_size)]


def empty_stats(q: Tensor, chunk_size: int) -> List[Tensor]:
    """Empty tensors shaped as what :func:`forward_kernels` returns after h (for fake implementations)."""
    batch, heads, n, head_dim = q.shape
    rows, chunks = batch * heads, triton.cdiv(n, chunk_size)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    buffers = dict(cum=((rows, n), torch.float64), row_log=((rows, n), torch.float64), argmax=((rows, n), torch.int32),
                   state_c=((rows, chunks, head_dim, head_dim), _forward_kernels.state_dtype(q.dtype)),
                   state_n=((rows, chunks, head_dim), acc_dtype), chunk_max=((rows, chunks), torch.float64),
                   chunk_argmax=((rows, chunks), torch.int32))
    return [q.new_empty(rows, n, dtype=acc_dtype)] + [q.new_empty(*buffers[name][0], dtype=buffers[name][1])
                                                      for name in _forward_kernels.STATE_NAMES]


@custom_op('mmseg_vil::mlstm_fused_chunkwise_backward')
def _backward(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, h: Tensor,
              stats: List[Tensor], eps: float, chunk_size: int, reverse: bool) -> List[Tensor]:
    """``[dq, dk, dv (B, N, NH, DH), d_igate, d_fgate (B, N, NH)]``."""
    if grad_h.stride(-1) != 1:  # e.g. the expanded gradient of h.sum()
        grad_h = grad_h.contiguous()
    return _backward_kernels.backward(grad_h, q, k, v, igate, fgate, h, stats, eps,
                                      _config(q.shape[-1], chunk_size, reverse, q.dtype))


@_backward.register_fake
def _(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, h: Tensor, stats: List[Tensor],
      eps: float, chunk_size: int, reverse: bool) -> List[Tensor]:
    batch, heads, n, head_dim = q.shape
    return [q.new_empty(batch, n, heads, head_dim) for _ in range(3)] + [
        igate.new_empty(batch, n, heads), fgate.new_empty(batch, n, heads)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, igate, fgate, eps, chunk_size, reverse = inputs
    ctx.save_for_backward(q, k, v, igate, fgate, *output)
    ctx.options = (eps, chunk_size, reverse)


def _autograd_backward(ctx, grads):
    q, k, v, igate, fgate, h, *stats = ctx.saved_tensors
    grads = _backward(grads[0], q, k, v, igate, fgate, h, stats, *ctx.options)
    return (*(grad.transpose(1, 2) for grad in grads), None, None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def mlstm_fused_chunkwise(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6,
                          reverse: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Chunkwise Triton mLSTM: the parallel cell's function and exact gradients in time and memory linear in N.

    Args:
        q, k, v: ``(B, NH, N, DH)``, any strides with a unit head-dim stride (e.g. views of a projection output).
        igate, fgate: ``(B, NH, N)`` gate pre-activations, any strides.
        eps: added to the normaliser.
        reverse: traverse the tokens backwards, i.e. ``parallel(*flipped inputs).flip(2)``, without flipping copies.
        chunk_size: steps per chunk: 16, 32 or 64.

    Returns:
        ``(B, NH, N, DH)`` in the dtype of ``q``: a transposed view of a contiguous ``(B, N, NH, DH)`` tensor.
    """
    refuse_unvalidated_cuda(q)
    return mlstm_fused_chunkwise_kernels(q, k, v, igate, fgate, eps, reverse, chunk_size)


def refuse_unvalidated_cuda(q: Tensor) -> None:
    """Raise for CUDA tensors unless :func:`cuda_allowed` (benchmarks/RESULTS.md, seventh and eighth sessions)."""
    if q.device.type == 'cuda' and not cuda_allowed(q.dtype):
        raise RuntimeError("The fused_chunkwise mLSTM backend does not take float32 CUDA tensors (it misses the "
                           "official model's float32 outputs by a hair, benchmarks/RESULTS.md): run it under bf16/fp16 "
                           "autocast (--amp), or use mlstm_backend='fused' or 'auto' in float32 (or set "
                           f"{CUDA_OVERRIDE_ENV}=1 to validate it).")


def forward_kernels(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float, chunk_size: int,
                    reverse: bool) -> List[Tensor]:
    """The forward kernels outside autograd, for callers with their own backward (the ViL mixer's one op):
    ``h (B, N, NH, DH)``, then what :func:`backward_kernels_into` needs (its ``stats``): the row sums ``(B*NH, N)``
    and the chunk states (forward.STATE_NAMES; about DH x DH 16-bit values per chunk of each head)."""
    return _forward_kernels.forward(q, k, v, igate, fgate, eps, _config(q.shape[-1], chunk_size, reverse, q.dtype))


def backward_kernels_into(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, h: Tensor,
                          stats: Sequence[Tensor], eps: float, chunk_size: int, reverse: bool, dq: Tensor, dk: Tensor,
                          dv: Tensor, d_igate: Tensor, d_fgate: Tensor) -> None:
    """The backward kernels writing into the caller's buffers: ``dq, dk, dv (B, N, NH, DH)`` and ``d_igate, d_fgate
    (B, N, NH)`` of any strides (e.g. head views of one q | k | v gradient buffer)."""
    _backward_kernels.backward(grad_h, q, k, v, igate, fgate, h, stats, eps,
                               _config(q.shape[-1], chunk_size, reverse, q.dtype), out=(dq, dk, dv, d_igate, d_fgate))


def mlstm_fused_chunkwise_kernels(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6,
                                  reverse: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """:func:`mlstm_fused_chunkwise` without its refusal of CUDA tensors: what benchmarks/mlstm_kernel_check.py runs
    to validate the kernels on a GPU."""
    if chunk_size not in (16, 32, MAX_CHUNK_SIZE):
        raise ValueError(f'chunk_size must be 16, 32 or {MAX_CHUNK_SIZE}, got {chunk_size}.')
    if q.device.type != 'cuda' and not _kernels_interpreted():
        raise RuntimeError(f'The fused_chunkwise mLSTM backend runs only under the Triton interpreter for now (got '
                           f"{q.device.type} tensors); use 'chunkwise' or 'parallel', or set TRITON_INTERPRET=1 "
                           'before importing mmseg_vil.')
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'The fused_chunkwise mLSTM backend supports {SUPPORTED_DTYPES}, got {q.dtype}.')
    k, v = k.to(q.dtype), v.to(q.dtype)
    # The kernels take any step/head/batch strides; only a non-unit head-dim stride costs a copy.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    h, *_ = _forward(q, k, v, igate, fgate, eps, chunk_size, reverse)
    return h.transpose(1, 2)
