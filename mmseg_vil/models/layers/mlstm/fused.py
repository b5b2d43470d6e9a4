"""Fused mLSTM for CUDA: our own Triton forward and backward with the exact gradients of the parallel cell.

Why the gradient is derived by hand: the mlstm-kernels Triton backward holds the normaliser and the stabiliser
constant (mlstm_kernels.md §3.2), ViL was trained with full autograd. Per head, with
P[t,s] = (q_t.k_s / sqrt(DH)) exp(logD[t,s]) the un-stabilised scores, S_t = sum_s P[t,s] and m_t the row max of
logD, the cell is (vil_spec.md §2.6)

    h_t = sum_s P[t,s] v_s / Z_t,   Z_t = max(|S_t|, 1) + eps exp(m_t),

which is the stabilised formula multiplied out, so it has the same gradient. With g_t = dL/dh_t, the stabilised row
sum r_t = S_t exp(-m_t), the divisor d_t = max(|r_t|, exp(-m_t)) + eps and delta_t = g_t.h_t:

    dP[t,s] exp(logD[t,s]) = (g_t.v_s / d_t + beta_t) exp(logD[t,s] - m_t),
        beta_t = -delta_t / d_t * sign(r_t) * [|r_t| > exp(-m_t)]     (through the normaliser's |S| branch)
    dL/dm_t (direct) = -delta_t eps / d_t                              (through eps exp(m), either branch)

The tile kernel turns the first line into dq, dk, dv. The row and column sums of dL/dlogD[t,s] = dP[t,s] P[t,s] are
q_t.dq_t and k_s.dk_s, so the gate gradients need no N x N work. m_t is logD[t, s*_t] at the argmax s*_t (a cummax,
like the gradient of torch's max), so its gradient is added to row t and to column s*_t. Then with
logD[t,s] = F_t - F_s + i_s: di_s = column sum, dF_t = row sum - column sum, dlog f = reverse cumsum of dF,
dfgate = dlog f * sigmoid(-fgate).

Per call: forward = stabiliser scan + one tile launch; backward = per-row prologue + three tile launches (dq, dk, dv)
+ gate-gradient epilogue. Few launches matter: at ViL sizes the GPU work is well under a millisecond.
"""
import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
import triton
from torch import Tensor

from . import _triton_kernels as kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels_interpreted() -> bool:
    """True when the kernels were decorated under ``TRITON_INTERPRET=1``, i.e. they run on CPU tensors."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernels.mlstm_tile_kernel, InterpretedFunction)


# Set only by cuda_launch_configs(), for tests: the interpreter then runs the CUDA launch configurations.
_force_cuda_configs = False


@contextmanager
def cuda_launch_configs() -> Iterator[None]:
    """Launch with the CUDA tile sizes and scan blocks even under ``TRITON_INTERPRET=1`` (also fused_chunkwise's
    head-dim blocks).

    So that CPU tests run the exact tiles, head-dim chunks and block boundaries the GPU runs (num_warps and
    num_stages are ignored by the interpreter). On CUDA this changes nothing.
    """
    global _force_cuda_configs
    previous, _force_cuda_configs = _force_cuda_configs, True
    try:
        yield
    finally:
        _force_cuda_configs = previous


def _cuda_configs() -> bool:
    """Whether launches use the CUDA configurations: on CUDA, or when forced by :func:`cuda_launch_configs`."""
    return _force_cuda_configs or not _kernels_interpreted()


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes, head-dim chunks, warps and pipeline stages (benchmarks/mlstm_kernel_notes.md).

    Half precision: the fastest of the H200 sweep for head dims 96 and 384 (forward+backward replayed from a CUDA
    graph). float32 (3xTF32) operands take twice the shared memory: smaller tiles free of spills in the ptxas report,
    one pipeline stage above DH=128 to fit. The interpreter gets large unequal tiles and small chunks: fewer programs
    run faster there; the tests also run the CUDA configurations under it (:func:`cuda_launch_configs`).
    """
    chunk = min(128, max(16, triton.next_power_of_2(head_dim)))
    if not _cuda_configs():
        return dict(BLOCK_OWN=128, BLOCK_LOOP=64, BLOCK_DK=min(chunk, 64), BLOCK_DZ=min(chunk, 64))
    if dtype != torch.float32:
        return dict(BLOCK_OWN=64, BLOCK_LOOP=32, BLOCK_DK=chunk, BLOCK_DZ=chunk, num_warps=4, num_stages=2)
    small_dk, small_dz = min(chunk, 32), min(chunk, 64)
    if head_dim <= 128:
        return dict(BLOCK_OWN=64, BLOCK_LOOP=32, BLOCK_DK=small_dk, BLOCK_DZ=small_dz, num_warps=4, num_stages=2)
    return dict(BLOCK_OWN=32, BLOCK_LOOP=32, BLOCK_DK=small_dk, BLOCK_DZ=small_dz, num_warps=4, num_stages=1)


def _scan_block(n: int) -> int:
    """Steps per block of the per-head scans; the interpreter takes small blocks to exercise the carries."""
    return min(1024, triton.next_power_of_2(n)) if _cuda_configs() else 64


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: 3xTF32 (tensor cores, close to float32 accuracy) unless torch itself allows plain TF32, so
    results match the torch backends. Half-precision dots always accumulate in float32; the precision is ignored."""
    return 'tf32x3' if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else 'tf32'


def _dot_options(dtype: torch.dtype) -> dict:
    """The interpreter multiplies bfloat16 bit patterns as integers, so there the dot operands go to float32 (exact
    products, the same float32 accumulation as the tensor cores)."""
    return dict(DOT_PRECISION=_dot_precision(dtype),
                DOT_IN_FLOAT32=dtype == torch.bfloat16 and _kernels_interpreted())


def _tile_product(x: Tensor, y: Tensor, z: Tensor, logs, key_major: bool, out_dtype: torch.dtype,
                  shift: Optional[Tensor] = None, normaliser: Optional[Tuple[Tensor, Tensor, float]] = None) -> Tensor:
    """One launch of the tile kernel; ``normaliser = (norm_floor, row_sum_out, eps)`` makes it the forward."""
    heads_total, n, head_dim = x.shape
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    norm_floor, row_sum, eps = normaliser or (None, None, 0.0)
    config = _launch_config(head_dim, x.dtype)
    grid = (triton.cdiv(n, config['BLOCK_OWN']), heads_total, triton.cdiv(head_dim, config['BLOCK_DZ']))
    kernels.mlstm_tile_kernel[grid](
        x, y, z, out, shift, *logs, norm_floor, row_sum, n, 1 / math.sqrt(head_dim), eps, HEAD_DIM=head_dim,
        KEY_MAJOR=key_major, FORWARD=normaliser is not None, HAS_SHIFT=shift is not None, **_dot_options(x.dtype),
        **config)
    return out


# The kernels are wrapped as torch.library custom ops with a registered autograd formula, so that torch.compile
# treats them as opaque calls (no graph break, and Inductor never re-compiles our Triton kernels).
@torch.library.custom_op('mmseg_vil::mlstm_fused_forward', mutates_args=())
def _fused_forward(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float) -> List[Tensor]:
    """``h`` and the per-row statistics the backward needs: norm floor, argmax, row sum and the four log terms."""
    batch, heads, n, head_dim = q.shape
    q, k, v = (x.contiguous().view(batch * heads, n, head_dim) for x in (q, k, v))
    igate, fgate = (x.contiguous().view(batch * heads, n) for x in (igate, fgate))
    logs = [torch.empty(batch * heads, n, dtype=torch.float32, device=q.device) for _ in range(4)]
    norm_floor, row_sum = (torch.empty_like(logs[0]) for _ in range(2))
    argmax = torch.empty(batch * heads, n, dtype=torch.int32, device=q.device)
    kernels.mlstm_stabiliser_kernel[(batch * heads,)](igate, fgate, *logs, norm_floor, argmax, n,
                                                       BLOCK_N=_scan_block(n))
    h = _tile_product(q, k, v, logs, key_major=False, out_dtype=q.dtype, normaliser=(norm_floor, row_sum, eps))
    return [h.view(batch, heads, n, head_dim), norm_floor, argmax, row_sum, *logs]


@_fused_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float) -> List[Tensor]:
    rows = igate.new_empty(igate.shape, dtype=torch.float32).flatten(0, 1)
    return [torch.empty_like(q, memory_format=torch.contiguous_format), rows, rows.to(torch.int32),
            *(torch.empty_like(rows) for _ in range(5))]


@torch.library.custom_op('mmseg_vil::mlstm_fused_backward', mutates_args=())
def _fused_backward(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, h: Tensor, igate: Tensor, fgate: Tensor,
                    norm_floor: Tensor, argmax: Tensor, row_sum: Tensor, log_a: Tensor, log_b: Tensor,
                    log_c: Tensor, log_d: Tensor, eps: float) -> List[Tensor]:
    """Gradients of q, k, v, igate and fgate, as derived in the module docstring."""
    batch, heads, n, head_dim = q.shape
    q, k, v, h = (x.contiguous().view(batch * heads, n, head_dim) for x in (q, k, v, h))
    igate, fgate = (x.contiguous().view(batch * heads, n) for x in (igate, fgate))
    logs = [log_a, log_b, log_c, log_d]
    heads_total = batch * heads
    scaled_grad = torch.empty_like(q)
    row_shift, grad_m = (torch.empty_like(row_sum) for _ in range(2))
    column_grad_m = torch.zeros_like(row_sum)
    rows_per_program = 16
    kernels.mlstm_grad_prep_kernel[(triton.cdiv(heads_total * n, rows_per_program),)](
        grad_h.reshape(q.shape).contiguous(), h, row_sum, norm_floor, argmax, scaled_grad, row_shift, grad_m,
        column_grad_m, heads_total * n, n, eps, HEAD_DIM=head_dim, BLOCK_ROWS=rows_per_program,
        BLOCK_D=triton.next_power_of_2(head_dim))

    dq = _tile_product(scaled_grad, v, k, logs, key_major=False, out_dtype=torch.float32, shift=row_shift)
    dk = _tile_product(v, scaled_grad, q, logs, key_major=True, out_dtype=torch.float32, shift=row_shift)
    dv = _tile_product(k, q, scaled_grad, logs, key_major=True, out_dtype=v.dtype)

    dq_out, dk_out = torch.empty_like(q), torch.empty_like(k)
    d_igate, d_fgate = torch.empty_like(igate), torch.empty_like(fgate)
    kernels.mlstm_gate_grad_kernel[(heads_total,)](
        q, k, dq, dk, grad_m, column_grad_m, fgate, dq_out, dk_out, d_igate, d_fgate, n, HEAD_DIM=head_dim,
        BLOCK_N=min(64, _scan_block(n)), BLOCK_D=min(64, triton.next_power_of_2(head_dim)))
    return [dq_out.view(batch, heads, n, head_dim), dk_out.view(batch, heads, n, head_dim),
            dv.view(batch, heads, n, head_dim), d_igate.view(batch, heads, n), d_fgate.view(batch, heads, n)]


@_fused_backward.register_fake
def _(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, h: Tensor, igate: Tensor, fgate: Tensor, *stats) -> List[Tensor]:
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, igate, fgate)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, igate, fgate, eps = inputs
    ctx.save_for_backward(q, k, v, igate, fgate, *output)
    ctx.eps = eps


def _backward(ctx, grads):
    q, k, v, igate, fgate, h, *stats = ctx.saved_tensors
    return (*_fused_backward(grads[0], q, k, v, h, igate, fgate, *stats, ctx.eps), None)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def mlstm_fused(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6) -> Tensor:
    """Fused mLSTM, same arguments and result as :func:`~.parallel.mlstm_parallel`; CUDA (or the Triton interpreter)."""
    if q.device.type != 'cuda' and not _kernels_interpreted():
        raise RuntimeError(f'The fused mLSTM backend needs CUDA tensors (got {q.device.type}); on CPU use the '
                           "'chunkwise' or 'parallel' backend, or set TRITON_INTERPRET=1 before importing mmseg_vil.")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'The fused mLSTM backend supports {SUPPORTED_DTYPES}, got {q.dtype}.')
    return _fused_forward(q, k.to(q.dtype), v.to(q.dtype), igate, fgate, eps)[0]
