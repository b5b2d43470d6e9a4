"""Gate scans and the exact max stabiliser of the chunkwise mLSTM, chunk by chunk.

Per head, with F_t = sum_{r<=t} logsigmoid(fgate_r), logD[t,s] = F_t - F_s + i_s (s <= t) and the parallel cell's
row max m_t = max_{s<=t} logD[t,s], write M_t = m_t - F_t = max_{s<=t} (i_s - F_s): a running max, non-decreasing in
t, with argmax s*_t (ties to the later step). Every stabilised decay is exp((i_s - F_s) - M_t) <= 1, and splitting it
at the end e of any chunk with e between s and t gives two factors that are each <= 1:

    exp((i_s - F_s) - M_e)      the key s summed into the state after the chunk (its weight in C, n),
    exp(M_e - M_t)              that state read by query t (forward), or query t summed into the reverse state.

So the states need no running rescaling, and the stabiliser is the parallel form's, not a floored or chunk-local one.
|F| grows with N, so nothing is stored relative to step 0: each chunk c works relative to its own start,

    b_t = F_t - F_{start(c)-1}   (local cumsum),   u_s = i_s - b_s,   mu_t = m_t - b_t = max(m_{c-1}, max_{s<=t} u_s)

with m_{c-1} = m at the end of the previous chunk (-inf before the first). In those terms the in-chunk decay is
exp(u_s - mu_t), the key weight into the chunk's state exp(u_s - mu_e), the previous state's weight for query t
exp(m_{c-1} - mu_t), and the chunk end value m_c = b_e + mu_e. Only m_c (and its argmax) crosses chunks, through the
max-plus recurrence

    mu_e = max(m_{c-1}, L_c),   m_c = b_e + mu_e,   L_c = max_s u_s (the chunk's own max),

so everything else of a chunk is computed in parallel over chunks relative to L_c (the running max of u within the
chunk, the summary sum_s exp(u_s - L_c) k_s v_s^T), and the scan over chunks only rescales by exp(m_{c-1} - mu_e)
and exp(L_c - mu_e), both <= 1. The gate scans run in float64 (differences of large local sums keep their digits);
every product then happens in the accumulation dtype.
"""
import triton
import triton.language as tl

from .._triton_kernels import _later_max


@triton.jit
def gate_scan(IGATE, FGATE, positions, valid, stride_i, stride_f):
    """Local cumsum b of logsigmoid(fgate) and the key log weights u = i - b (-inf past the end, so weight 0).

    logsigmoid(f) = min(f, 0) - log1p(exp(-|f|)), with log1p corrected for the rounding of 1 + x, in float64 like the
    quadratic kernels' gate scan: the GPU's float32 exp and log are approximations whose errors the cumsum would add
    up over the steps. The cumsum and u are float64. Only the chunk summary kernel runs this (a vector per chunk); it
    stores b.
    """
    igate = tl.load(IGATE + positions * stride_i, mask=valid, other=0.0).to(tl.float64)
    fgate = tl.load(FGATE + positions * stride_f, mask=valid, other=0.0).to(tl.float64)
    small = tl.exp(-tl.abs(fgate))
    shifted = 1.0 + small
    log1p = tl.log(shifted) - ((shifted - 1.0) - small) / shifted
    log_f = tl.where(valid, tl.minimum(fgate, 0.0) - log1p, 0.0)
    cum = tl.cumsum(log_f, 0)
    return cum, tl.where(valid, igate - cum, float('-inf'))


@triton.jit
def chunk_key_max(key_log, steps):
    """The chunk's own max L of u and its argmax (a step index; ties to the later step): reductions, no scan."""
    local_max = tl.max(key_log, 0)
    return local_max, tl.max(tl.where(key_log == local_max, steps, -1), 0)


@triton.jit
def running_key_max(key_log, steps):
    """max_{s<=t} u_s within the chunk and its argmax (ties to the later step): the part of the row stabiliser that
    does not depend on earlier chunks. Its last entries are ``chunk_key_max``."""
    return tl.associative_scan((key_log, steps), 0, _later_max)


@triton.jit
def row_stabiliser(run_max, run_argmax, prev_max, prev_argmax):
    """mu_t = max(prev_max, max_{s<=t} u_s) per step and the argmax s*_t from ``running_key_max``: the previous chunk
    end's argmax ``prev_argmax`` only where its m is strictly larger (ties to the later step)."""
    from_state = prev_max > run_max
    return tl.where(from_state, prev_max, run_max), tl.where(from_state, prev_argmax, run_argmax)


@triton.jit
def chunk_end(local_max, local_argmax, end_cum, prev_max, prev_argmax):
    """m, its argmax and mu at the chunk's last step from the previous chunk end's m and argmax, the chunk's own max
    L of u with its argmax (``chunk_key_max``) and its local cumsum b_e at the last step: one step of the max-plus
    recurrence (ties to the later step, as in ``row_stabiliser``)."""
    in_chunk = local_max >= prev_max
    end_row_log = tl.where(in_chunk, local_max, prev_max)
    return end_cum + end_row_log, tl.where(in_chunk, local_argmax, prev_argmax), end_row_log


@triton.jit
def chunk_stabiliser(IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, chunk, steps, positions, valid, stride_i,
                     CHUNK: tl.constexpr):
    """Everything a chunk program needs of the gates, from the per-step values the state kernels stored: the local
    cumsum b, the key log weights u, the row log stabiliser mu (+inf past the end, so that no decay there is
    positive), the argmax s*, whether s* lies before the chunk, and m at the previous chunk's end (-inf before the
    first)."""
    cum = tl.load(CUM + steps, mask=valid, other=0.0)
    row_log = tl.load(ROW_LOG + steps, mask=valid, other=float('inf'))
    argmax = tl.load(ARGMAX + steps, mask=valid, other=0)
    igate = tl.load(IGATE + positions * stride_i, mask=valid, other=0.0).to(tl.float64)
    key_log = tl.where(valid, igate - cum, float('-inf'))
    prev_max = tl.load(CHUNK_MAX + chunk - 1, mask=chunk > 0, other=float('-inf'))
    return cum, key_log, row_log, argmax, argmax < chunk * CHUNK, prev_max


@triton.jit
def causal_decay(key_log, row_log, steps, KEY_MAJOR: tl.constexpr, ACC: tl.constexpr):
    """``(CHUNK, CHUNK)`` in-chunk decays exp(u_s - mu_t) for s <= t, 0 elsewhere: rows t and columns s, or rows s
    and columns t when KEY_MAJOR (for sums over queries, without transposing tiles)."""
    if KEY_MAJOR:
        log_decay = tl.where(steps[:, None] <= steps[None, :], key_log[:, None] - row_log[None, :], float('-inf'))
    else:
        log_decay = tl.where(steps[None, :] <= steps[:, None], key_log[None, :] - row_log[:, None], float('-inf'))
    return tl.exp(log_decay.to(ACC))
