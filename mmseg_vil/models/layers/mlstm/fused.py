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

Per call: forward = stabiliser scan + one tile launch; backward = per-row prologue + tile launches for dq and for dk
with dv (one launch where the head is small enough, else two) + gate-gradient epilogue. Few launches matter: at ViL
sizes the GPU work is well under a millisecond.

No copies around the kernels either (they cost ~6 ms of a 37 ms ViL-T training step on an H200 when q, k, v, the
gates, h and its gradient were made contiguous and reverse blocks flipped them): the kernels read every input through
its strides, run the reversed cell by index arithmetic (scan step t reads token N-1-t), and write h and dq, dk, dv
token-major, the layout the mixer's per-head norm reads and its projection's gradient wants.
"""
import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..custom_op import custom_op
from . import _triton_kernels as kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """Tile sizes, the largest head-dim chunks (:func:`_head_split`), warps, pipeline stages and whether dk and dv
    share one launch (benchmarks/mlstm_kernel_notes.md).

    Half precision: the fastest tiles of the H200 sweep for head dims 96 and 384 (forward+backward replayed from a
    CUDA graph, timed before the head split); dk and dv share a launch up to DH=128, above which its two pairs of
    accumulators spill at 4 warps (ptxas, DH=192). float32 (3xTF32) operands take twice the shared memory and more
    registers: smaller tiles free of spills in the ptxas report (at DH=96, where one program holds all output
    columns, loop tiles of 16 take about 180 registers, tiles of 32 about 250: too close to 255), one pipeline stage
    above DH=128 to fit, dk and dv apart (together they spill); float64 (exact reference runs, not tuned) takes the
    smallest of these. The interpreter gets large unequal tiles and small chunks: fewer programs run faster there;
    the tests also run the CUDA configurations under it (:func:`cuda_launch_configs`).
    """
    if not _cuda_configs():
        return dict(BLOCK_OWN=128, BLOCK_LOOP=64, BLOCK_DK=64, BLOCK_DZ=64, FUSE_DK_DV=True)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_OWN=64, BLOCK_LOOP=32, BLOCK_DK=128, BLOCK_DZ=128, FUSE_DK_DV=head_dim <= 128,
                    num_warps=4, num_stages=2)
    if head_dim <= 128 and dtype == torch.float32:
        return dict(BLOCK_OWN=64, BLOCK_LOOP=16, BLOCK_DK=32, BLOCK_DZ=64, FUSE_DK_DV=False, num_warps=4,
                    num_stages=2)
    return dict(BLOCK_OWN=32, BLOCK_LOOP=32, BLOCK_DK=32, BLOCK_DZ=64, FUSE_DK_DV=False, num_warps=4, num_stages=1)


def _head_split(head_dim: int, block: int) -> Tuple[int, int]:
    """(chunk, tail) of the head dims for chunks of at most ``block``: a power-of-two chunk and a tail chunk for the
    rest when that covers the head (96 = 64 + 32, 192 = 128 + 64; 64 without a tail), else chunks of ``block``
    (384 = 3 x 128; tail 0). Chunks and tails take at least 16 columns (the smallest ``tl.dot``), so only head dims
    below 16, tails that are no power of two (112 = 64 + 48 in 64) and heads that are no multiple of ``block`` above
    two chunks are padded (masked)."""
    chunk = min(block, max(16, 1 << (head_dim.bit_length() - 1)))
    tail = head_dim - chunk
    if tail <= 0 or tail >= chunk:
        return chunk, 0
    return chunk, max(16, triton.next_power_of_2(tail))


def _scan_block(n: int) -> int:
    """Steps per block of the per-head scans; the interpreter takes small blocks to exercise the carries."""
    return min(1024, triton.next_power_of_2(n)) if _cuda_configs() else 64


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: 3xTF32 (tensor cores, close to float32 accuracy) unless torch itself allows plain TF32, so
    results match the torch backends. Half-precision dots always accumulate in float32 (the precision is ignored);
    float64 dots are plain float64 ('ieee', the one precision that names no float32 format)."""
    if dtype == torch.float64:
        return 'ieee'
    return 'tf32x3' if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else 'tf32'


def _dot_options(dtype: torch.dtype) -> dict:
    """The interpreter multiplies bfloat16 bit patterns as integers, so there the dot operands go to float32 (exact
    products, the same float32 accumulation as the tensor cores)."""
    return dict(DOT_PRECISION=_dot_precision(dtype),
                DOT_IN_FLOAT32=dtype == torch.bfloat16 and _kernels_interpreted())


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and per-step values: float32, float64 for float64 inputs (exact reference runs)."""
    return torch.promote_types(dtype, torch.float32)


def _token_major(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh ``(B, N, NH, DH)`` buffer for a ``(B, NH, N, DH)`` result: what the ViL mixer reads (its per-head norm
    takes ``(B, N, NH, DH)``) and what the gradient of its head split wants, so that neither needs a copy."""
    batch, heads, n, head_dim = like.shape
    return torch.empty(batch, n, heads, head_dim, dtype=dtype, device=like.device)


def _tile_config(head_dim: int, dtype: torch.dtype) -> dict:
    """The tile kernel's launch options: :func:`_launch_config` with its head-dim chunks split (:func:`_head_split`)."""
    config = dict(_launch_config(head_dim, dtype))
    config.pop('FUSE_DK_DV')
    config['BLOCK_DK'], config['BLOCK_DK_TAIL'] = _head_split(head_dim, config['BLOCK_DK'])
    config['BLOCK_DZ'], config['BLOCK_DZ_TAIL'] = _head_split(head_dim, config['BLOCK_DZ'])
    return config


def _output_slices(head_dim: int, config: dict) -> int:
    """Programs that share a row of the output (grid axis 2): one where the head is one chunk and a tail."""
    return triton.cdiv(head_dim, config['BLOCK_DZ'] + config['BLOCK_DZ_TAIL'])


def _tile_product(x: Tensor, y: Tensor, z: Tensor, out: Tensor, logs, key_major: bool, reverse: bool,
                  shift: Optional[Tensor] = None, normaliser: Optional[Tuple[Tensor, Tensor, float]] = None,
                  second: Optional[Tuple[Tensor, Tensor]] = None, dots: Optional[Tuple[Tensor, Tensor]] = None) -> None:
    """One launch of the tile kernel into ``out``; all are ``(B, NH, N, DH)`` views of any strides.
    ``normaliser = (norm_floor, row_sum_out, eps)`` makes it the forward; ``second = (x2, out2)`` also computes
    ``out2`` from ``x2`` with y and z swapped and no shift (dv beside dk: only where :func:`_fuses_dk_dv`);
    ``dots = (w, dots_out)`` also each row's inner product of ``out`` with ``w`` into ``dots_out`` (output slices,
    B * NH * N)."""
    batch, heads, n, head_dim = x.shape
    norm_floor, row_sum, eps = normaliser or (None, None, 0.0)
    x2, out2 = second or (None, None)
    dot_with, dots_out = dots or (None, None)
    config = _tile_config(head_dim, x.dtype)
    grid = (triton.cdiv(n, config['BLOCK_OWN']), batch * heads, _output_slices(head_dim, config))
    kernels.mlstm_tile_kernel[grid](
        x, y, z, out, x2, out2, dot_with, dots_out, shift, *logs, norm_floor, row_sum, *x.stride(), *y.stride(),
        *z.stride(), *out.stride(), *(x2.stride() if second else (0,) * 4), *(out2.stride() if second else (0,) * 4),
        *(dot_with.stride() if dots else (0,) * 4), n, heads, eps, HEAD_DIM=head_dim, SCALE=1 / math.sqrt(head_dim),
        REVERSE=reverse, KEY_MAJOR=key_major, FORWARD=normaliser is not None, HAS_SHIFT=shift is not None,
        DUAL=second is not None, HAS_DOTS=dots is not None, **_dot_options(x.dtype), **config)


def _fuses_dk_dv(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether dk and dv come from one key-major launch: where the launch configuration asks for it and the head dims
    are one chunk and a tail, split alike for the x.y dot and the output columns (the y tiles are z tiles too)."""
    config = _launch_config(head_dim, dtype)
    split = _head_split(head_dim, config['BLOCK_DK'])
    return config['FUSE_DK_DV'] and split == _head_split(head_dim, config['BLOCK_DZ']) and head_dim <= sum(split)


# The kernels are wrapped as torch.library custom ops with a registered autograd formula, so that torch.compile
# treats them as opaque calls (no graph break, and Inductor never re-compiles our Triton kernels). A custom op returns
# fresh tensors, so the ops return the token-major buffers and the wrappers turn them into (B, NH, N, DH) views.
@custom_op('mmseg_vil::mlstm_fused_forward')
def fused_forward(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float,
                   reverse: bool) -> List[Tensor]:
    """``h`` as a ``(B, N, NH, DH)`` buffer and the per-step values the backward needs, ``(B*NH, N)`` each: norm
    floor, argmax, row sum and the four log terms. Inputs of any strides are read in place."""
    batch, heads, n = q.shape[:3]
    acc_dtype = _accumulation_dtype(q.dtype)
    logs = [q.new_empty(batch * heads, n, dtype=acc_dtype) for _ in range(4)]
    norm_floor, row_sum = (torch.empty_like(logs[0]) for _ in range(2))
    argmax = q.new_empty(batch * heads, n, dtype=torch.int32)
    kernels.mlstm_stabiliser_kernel[(batch * heads,)](
        igate, fgate, *logs, norm_floor, argmax, *igate.stride(), *fgate.stride(), n, heads, REVERSE=reverse,
        BLOCK_N=_scan_block(n))
    h = _token_major(q, q.dtype)
    _tile_product(q, k, v, h.transpose(1, 2), logs, key_major=False, reverse=reverse,
                  normaliser=(norm_floor, row_sum, eps))
    return [h, norm_floor, argmax, row_sum, *logs]


def empty_forward_outputs(q: Tensor) -> List[Tensor]:
    """Empty tensors shaped like :func:`fused_forward`'s outputs for ``q (B, NH, N, DH)``."""
    batch, heads, n = q.shape[:3]
    rows = q.new_empty(batch * heads, n, dtype=_accumulation_dtype(q.dtype))
    return [_token_major(q, q.dtype), rows, rows.to(torch.int32), *(torch.empty_like(rows) for _ in range(5))]


@fused_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float, reverse: bool) -> List[Tensor]:
    return empty_forward_outputs(q)


def backward_into(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, h: Tensor, igate: Tensor, fgate: Tensor,
                  stats: List[Tensor], eps: float, reverse: bool, dq: Tensor, dk: Tensor, dv: Tensor, d_igate: Tensor,
                  d_fgate: Tensor) -> None:
    """The gradients derived in the module docstring, written into ``dq, dk, dv`` (``(B, N, NH, DH)``, e.g. head views
    of one q | k | v gradient buffer) and ``d_igate, d_fgate`` (``(B, NH, N)``), all of any strides. ``h`` and
    ``grad_h`` are ``(B, N, NH, DH)``, of any strides (e.g. the expanded gradient of ``h.sum()``); ``stats`` are the
    forward's per-step outputs."""
    norm_floor, argmax, row_sum, *logs = stats
    batch, heads, n, head_dim = q.shape
    heads_total = batch * heads
    scaled_grad = _token_major(q, q.dtype).transpose(1, 2)
    row_shift, grad_m = (torch.empty_like(row_sum) for _ in range(2))
    column_grad_m = torch.zeros_like(row_sum)
    rows_per_program = 16
    kernels.mlstm_grad_prep_kernel[(triton.cdiv(heads_total * n, rows_per_program),)](
        grad_h, h, row_sum, norm_floor, argmax, scaled_grad, row_shift, grad_m, column_grad_m,
        *grad_h.transpose(1, 2).stride(), *h.transpose(1, 2).stride(), *scaled_grad.stride(), heads_total * n, n,
        heads, eps, HEAD_DIM=head_dim, REVERSE=reverse, BLOCK_ROWS=rows_per_program,
        BLOCK_D=triton.next_power_of_2(head_dim))
    # q.dq and k.dk of each step (the gate gradients) come from the dq and dk launches, from the float32 (float64)
    # accumulators before dq and dk are rounded to q's dtype
    slices = _output_slices(head_dim, _tile_config(head_dim, q.dtype))
    row_dots, column_dots = (row_sum.new_empty(slices, heads_total * n) for _ in range(2))
    _tile_product(scaled_grad, v, k, dq.transpose(1, 2), logs, key_major=False, reverse=reverse, shift=row_shift,
                  dots=(q, row_dots))
    fuse_dk_dv = _fuses_dk_dv(head_dim, q.dtype)
    _tile_product(v, scaled_grad, q, dk.transpose(1, 2), logs, key_major=True, reverse=reverse, shift=row_shift,
                  second=(k, dv.transpose(1, 2)) if fuse_dk_dv else None, dots=(k, column_dots))
    if not fuse_dk_dv:
        _tile_product(k, q, scaled_grad, dv.transpose(1, 2), logs, key_major=True, reverse=reverse)
    kernels.mlstm_gate_grad_kernel[(heads_total,)](
        grad_m, column_grad_m, row_dots, column_dots, fgate, d_igate, d_fgate, *fgate.stride(), *d_igate.stride(), n,
        heads, SLICES=slices, REVERSE=reverse, BLOCK_N=min(64, _scan_block(n)))


@custom_op('mmseg_vil::mlstm_fused_backward')
def fused_backward(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, h: Tensor, igate: Tensor, fgate: Tensor,
                   norm_floor: Tensor, argmax: Tensor, row_sum: Tensor, log_a: Tensor, log_b: Tensor,
                   log_c: Tensor, log_d: Tensor, eps: float, reverse: bool) -> List[Tensor]:
    """:func:`backward_into` fresh buffers: dq, dk, dv as ``(B, N, NH, DH)`` (the layout of the gradient of the
    mixer's projection output), d_igate and d_fgate ``(B, NH, N)``."""
    grads = [_token_major(q, q.dtype), _token_major(q, q.dtype), _token_major(v, v.dtype),
             igate.new_empty(igate.shape), fgate.new_empty(fgate.shape)]
    backward_into(grad_h, q, k, v, h, igate, fgate, [norm_floor, argmax, row_sum, log_a, log_b, log_c, log_d], eps,
                  reverse, *grads)
    return grads


@fused_backward.register_fake
def _(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, h: Tensor, igate: Tensor, fgate: Tensor, *stats_eps_reverse
      ) -> List[Tensor]:
    return [_token_major(q, q.dtype), _token_major(q, q.dtype), _token_major(v, v.dtype), igate.new_empty(igate.shape),
            fgate.new_empty(fgate.shape)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, igate, fgate, eps, reverse = inputs
    ctx.save_for_backward(q, k, v, igate, fgate, *output)
    ctx.options = (eps, reverse)
    ctx.set_materialize_grads(False)  # the per-step outputs get no gradient: no zero tensors for them


def _backward(ctx, grads):
    q, k, v, igate, fgate, h, *stats = ctx.saved_tensors
    dq, dk, dv, d_igate, d_fgate = fused_backward(grads[0], q, k, v, h, igate, fgate, *stats, *ctx.options)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), d_igate, d_fgate, None, None


fused_forward.register_autograd(_backward, setup_context=_setup_context)


def mlstm_fused(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6,
                reverse: bool = False) -> Tensor:
    """Fused mLSTM on CUDA (or under the Triton interpreter).

    Args:
        q, k, v: ``(B, NH, N, DH)``, any strides (e.g. head views of one projection output; read in place).
        igate, fgate: ``(B, NH, N)`` gate pre-activations, any strides.
        eps: added to the normaliser.
        reverse: traverse the tokens backwards, i.e. ``parallel(*flipped inputs).flip(2)``, without flipped copies.

    Returns:
        ``(B, NH, N, DH)`` in the dtype of ``q``: a transposed view of a contiguous ``(B, N, NH, DH)`` tensor. The
        gradients of q, k and v are such views too.
    """
    if q.device.type != 'cuda' and not _kernels_interpreted():
        raise RuntimeError(f'The fused mLSTM backend needs CUDA tensors (got {q.device.type}); on CPU use the '
                           "'chunkwise' or 'parallel' backend, or set TRITON_INTERPRET=1 before importing mmseg_vil.")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'The fused mLSTM backend supports {SUPPORTED_DTYPES}, got {q.dtype}.')
    return fused_forward(q, k.to(q.dtype), v.to(q.dtype), igate, fgate, eps, reverse)[0].transpose(1, 2)
