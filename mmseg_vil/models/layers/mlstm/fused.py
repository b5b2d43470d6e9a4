"""Fused mLSTM for CUDA: our own Triton forward and backward with the exact gradients of the parallel cell.

Why the gradient is derived by hand: the mlstm-kernels Triton backward holds the normaliser and the stabiliser constant
(mlstm_kernels.md §3.2), ViL was trained with full autograd. Per head, with P[t,s] = (q_t.k_s / sqrt(DH)) exp(logD[t,s])
the un-stabilised scores, S_t = sum_s P[t,s] and m_t the row max of logD, the cell is (vil_spec.md §2.6)

    h_t = sum_s P[t,s] v_s / Z_t,   Z_t = max(|S_t|, 1) + eps exp(m_t),

which is the stabilised formula multiplied out, so it has the same gradient. With g_t = dL/dh_t, the stabilised row
sum r_t = S_t exp(-m_t), the divisor d_t = max(|r_t|, exp(-m_t)) + eps and delta_t = g_t.h_t:

    dP[t,s] exp(logD[t,s]) = (g_t.v_s / d_t + beta_t) exp(logD[t,s] - m_t),
        beta_t = -delta_t / d_t * sign(r_t) * [|r_t| > exp(-m_t)]     (through the normaliser's |S| branch)
    dL/dm_t (direct) = -delta_t eps / d_t                              (through eps exp(m), either branch)

The kernels turn the first line into dq, dk, dv. The log-decay gradients need no kernel: the row and column sums of
dL/dlogD[t,s] = dP[t,s] P[t,s] are q_t.dq_t and k_s.dk_s. m_t is logD[t, s*_t] at the argmax s*_t (a cummax, like the
gradient of torch's max), so its gradient is added to row t and to column s*_t. Then with logD[t,s] = F_t - F_s + i_s:
di_s = column sum, dF_t = row sum - column sum, dlog f = reverse cumsum of dF, dfgate = dlog f * sigmoid(-fgate).
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
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
    return isinstance(kernels.mlstm_fwd_kernel, InterpretedFunction)


def _launch_config(head_dim: int) -> dict:
    """Tile sizes and warps by padded head dim; the accumulators (tile x BLOCK_D, float32) must fit in registers."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 128:
        return dict(BLOCK_Q=64, BLOCK_K=64, BLOCK_D=block_d, num_warps=4)
    if block_d <= 256:
        return dict(BLOCK_Q=64, BLOCK_K=32, BLOCK_D=block_d, num_warps=8)
    return dict(BLOCK_Q=32, BLOCK_K=32, BLOCK_D=block_d, num_warps=8)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32 products unless torch itself allows TF32, so results match the torch backends."""
    return 'tf32' if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else 'ieee'


def _stabiliser(igate: Tensor, fgate: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-step vectors of the decay: F - m, i - F, exp(-m), and the argmax s*_t of row t's log decays.

    Uses m_t = max_{s<=t} logD[t,s] = F_t + cummax_t(i - F). Computed in float64 and rounded once, which keeps
    F_t - F_s accurate over long sequences.
    """
    cum_log_f = torch.cumsum(F.logsigmoid(fgate.double()), dim=-1)
    running_max, argmax = torch.cummax(igate.double() - cum_log_f, dim=-1)
    m = cum_log_f + running_max
    return (cum_log_f - m).float(), (igate.double() - cum_log_f).float(), torch.exp(-m).float(), argmax


class FusedMLSTM(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; gradients as derived in the module docstring."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float) -> Tensor:
        batch, heads, n, head_dim = q.shape
        q, k, v = (x.contiguous().view(batch * heads, n, head_dim) for x in (q, k, v))
        row_log, col_log, norm_floor, argmax = _stabiliser(igate, fgate)
        h = torch.empty_like(q)
        row_sum = torch.empty(batch * heads, n, dtype=torch.float32, device=q.device)
        config = _launch_config(head_dim)
        grid = (triton.cdiv(n, config['BLOCK_Q']), batch * heads)
        kernels.mlstm_fwd_kernel[grid](q, k, v, row_log, col_log, norm_floor, h, row_sum, n, head_dim,
                                       1 / math.sqrt(head_dim), eps, DOT_PRECISION=_dot_precision(q.dtype), **config)
        ctx.save_for_backward(q, k, v, h, fgate, row_log, col_log, norm_floor, argmax, row_sum)
        ctx.eps = eps
        ctx.igate_dtype = igate.dtype
        return h.view(batch, heads, n, head_dim)

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        q, k, v, h, fgate, row_log, col_log, norm_floor, argmax, row_sum = ctx.saved_tensors
        heads_total, n, head_dim = q.shape
        grad_h = grad_h.reshape(heads_total, n, head_dim).to(q.dtype).contiguous()
        divisor = torch.maximum(row_sum.abs(), norm_floor) + ctx.eps
        delta = (grad_h.float() * h.float()).sum(-1)
        grad_scale = 1 / divisor
        row_shift = -delta / divisor * torch.sign(row_sum) * (row_sum.abs() > norm_floor)
        grad_m = -delta * ctx.eps / divisor

        dq, dk, dv = (torch.empty(heads_total, n, head_dim, dtype=torch.float32, device=q.device) for _ in range(3))
        config = _launch_config(head_dim)
        common = dict(seq_len=n, head_dim=head_dim, scale=1 / math.sqrt(head_dim),
                      DOT_PRECISION=_dot_precision(q.dtype), **config)
        kernels.mlstm_bwd_dq_kernel[(triton.cdiv(n, config['BLOCK_Q']), heads_total)](
            q, k, v, grad_h, row_log, col_log, grad_scale, row_shift, dq, **common)
        kernels.mlstm_bwd_dkdv_kernel[(triton.cdiv(n, config['BLOCK_K']), heads_total)](
            q, k, v, grad_h, row_log, col_log, grad_scale, row_shift, dk, dv, **common)

        grad_m = grad_m.view_as(fgate)
        row_total = (q.float() * dq).sum(-1).view_as(fgate) + grad_m
        column_total = (k.float() * dk).sum(-1).view_as(fgate).scatter_add(-1, argmax, grad_m)
        grad_cum_log_f = row_total - column_total
        grad_log_f = grad_cum_log_f.flip(-1).cumsum(-1).flip(-1)
        grad_fgate = grad_log_f * torch.sigmoid(-fgate.float())
        shape = fgate.shape + (head_dim,)
        return (dq.view(shape).to(q.dtype), dk.view(shape).to(k.dtype), dv.view(shape).to(v.dtype),
                column_total.to(ctx.igate_dtype), grad_fgate.to(fgate.dtype), None)


def mlstm_fused(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6) -> Tensor:
    """Fused mLSTM, same arguments and result as :func:`~.parallel.mlstm_parallel`; CUDA (or the Triton interpreter)."""
    if q.device.type != 'cuda' and not _kernels_interpreted():
        raise RuntimeError(f'The fused mLSTM backend needs CUDA tensors (got {q.device.type}); on CPU use the '
                           "'chunkwise' or 'parallel' backend, or set TRITON_INTERPRET=1 before importing mmseg_vil.")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'The fused mLSTM backend supports {SUPPORTED_DTYPES}, got {q.dtype}.')
    return FusedMLSTM.apply(q, k.to(q.dtype), v.to(q.dtype), igate, fgate, eps)
