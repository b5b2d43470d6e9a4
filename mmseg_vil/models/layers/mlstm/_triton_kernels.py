"""Triton kernels of the fused mLSTM backend (``fused.py`` derives the math they implement).

Flash-attention style: a program owns one tile of queries (forward, dq) or of keys (dk, dv) and walks the causal tiles
of the other side, so no N x N matrix is ever stored. The stabiliser m is known up front (a cummax computed outside),
so unlike softmax attention no running rescaling is needed: the stabilised decay of (query t, key s) is
``exp(row_log[t] + col_log[s])`` with ``row_log = F - m`` and ``col_log = i - F``. Head dims are padded to a power of
two (at least 16, the smallest ``tl.dot``) through masks. Tensors are contiguous ``(B*NH, N, DH)``, per-step vectors
``(B*NH, N)``, all vectors and gradients float32.
"""
import triton
import triton.language as tl


@triton.jit
def _causal_decay(target_log, target_pos, source_log, source_pos):
    """exp(logD - m) of every (target, source) pair of a tile; 0 where the source lies in the target's future."""
    return tl.where(source_pos <= target_pos, tl.exp(target_log + source_log), 0.0)


@triton.jit
def _load_tile(ptr, offs_n, offs_d, seq_len, head_dim):
    return tl.load(ptr + offs_n[:, None] * head_dim + offs_d[None, :],
                   mask=(offs_n[:, None] < seq_len) & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _store_tile(ptr, value, offs_n, offs_d, seq_len, head_dim):
    tl.store(ptr + offs_n[:, None] * head_dim + offs_d[None, :], value.to(ptr.dtype.element_ty),
             mask=(offs_n[:, None] < seq_len) & (offs_d[None, :] < head_dim))


@triton.jit
def mlstm_fwd_kernel(Q, K, V, ROW_LOG, COL_LOG, NORM_FLOOR, H, ROW_SUM, seq_len, head_dim, scale, eps,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """h_t = (sum_s C[t,s] v_s) / (max(|sum_s C[t,s]|, exp(-m_t)) + eps); keeps sum_s C[t,s] for the backward."""
    q_start = tl.program_id(0) * BLOCK_Q
    head = tl.program_id(1).to(tl.int64)
    Q += head * seq_len * head_dim
    K += head * seq_len * head_dim
    V += head * seq_len * head_dim
    H += head * seq_len * head_dim
    ROW_LOG += head * seq_len
    COL_LOG += head * seq_len
    NORM_FLOOR += head * seq_len
    ROW_SUM += head * seq_len

    offs_t = q_start + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_t < seq_len
    q = _load_tile(Q, offs_t, offs_d, seq_len, head_dim)
    row_log = tl.load(ROW_LOG + offs_t, mask=rows, other=0.0)
    numerator = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for k_start in range(0, tl.minimum(q_start + BLOCK_Q, seq_len), BLOCK_K):
        offs_s = k_start + tl.arange(0, BLOCK_K)
        k = _load_tile(K, offs_s, offs_d, seq_len, head_dim)
        v = _load_tile(V, offs_s, offs_d, seq_len, head_dim)
        col_log = tl.load(COL_LOG + offs_s, mask=offs_s < seq_len, other=float('-inf'))
        decay = _causal_decay(row_log[:, None], offs_t[:, None], col_log[None, :], offs_s[None, :])
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale * decay
        row_sum += tl.sum(scores, axis=1)
        numerator += tl.dot(scores.to(v.dtype), v, input_precision=DOT_PRECISION)

    norm_floor = tl.load(NORM_FLOOR + offs_t, mask=rows, other=1.0)
    h = numerator / (tl.maximum(tl.abs(row_sum), norm_floor) + eps)[:, None]
    _store_tile(H, h, offs_t, offs_d, seq_len, head_dim)
    tl.store(ROW_SUM + offs_t, row_sum, mask=rows)


@triton.jit
def mlstm_bwd_dq_kernel(Q, K, V, GRAD_H, ROW_LOG, COL_LOG, GRAD_SCALE, ROW_SHIFT, DQ, seq_len, head_dim, scale,
                        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """dq_t = scale * sum_s dP[t,s] k_s, dP[t,s] = (grad_scale_t g_t.v_s + row_shift_t) exp(logD[t,s] - m_t)."""
    q_start = tl.program_id(0) * BLOCK_Q
    head = tl.program_id(1).to(tl.int64)
    Q += head * seq_len * head_dim
    K += head * seq_len * head_dim
    V += head * seq_len * head_dim
    GRAD_H += head * seq_len * head_dim
    DQ += head * seq_len * head_dim
    ROW_LOG += head * seq_len
    COL_LOG += head * seq_len
    GRAD_SCALE += head * seq_len
    ROW_SHIFT += head * seq_len

    offs_t = q_start + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_t < seq_len
    q = _load_tile(Q, offs_t, offs_d, seq_len, head_dim)
    grad_scale = tl.load(GRAD_SCALE + offs_t, mask=rows, other=0.0)
    scaled_grad = (_load_tile(GRAD_H, offs_t, offs_d, seq_len, head_dim) * grad_scale[:, None]).to(q.dtype)
    row_shift = tl.load(ROW_SHIFT + offs_t, mask=rows, other=0.0)
    row_log = tl.load(ROW_LOG + offs_t, mask=rows, other=0.0)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for k_start in range(0, tl.minimum(q_start + BLOCK_Q, seq_len), BLOCK_K):
        offs_s = k_start + tl.arange(0, BLOCK_K)
        k = _load_tile(K, offs_s, offs_d, seq_len, head_dim)
        v = _load_tile(V, offs_s, offs_d, seq_len, head_dim)
        col_log = tl.load(COL_LOG + offs_s, mask=offs_s < seq_len, other=float('-inf'))
        decay = _causal_decay(row_log[:, None], offs_t[:, None], col_log[None, :], offs_s[None, :])
        grad_p = (tl.dot(scaled_grad, tl.trans(v), input_precision=DOT_PRECISION) + row_shift[:, None]) * decay
        dq += tl.dot(grad_p.to(k.dtype), k, input_precision=DOT_PRECISION)
    _store_tile(DQ, dq * scale, offs_t, offs_d, seq_len, head_dim)


@triton.jit
def mlstm_bwd_dkdv_kernel(Q, K, V, GRAD_H, ROW_LOG, COL_LOG, GRAD_SCALE, ROW_SHIFT, DK, DV, seq_len, head_dim, scale,
                          BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """dk_s = scale * sum_t dP[t,s] q_t and dv_s = sum_t C[t,s] grad_scale_t g_t, over the queries t >= s."""
    k_start = tl.program_id(0) * BLOCK_K
    head = tl.program_id(1).to(tl.int64)
    Q += head * seq_len * head_dim
    K += head * seq_len * head_dim
    V += head * seq_len * head_dim
    GRAD_H += head * seq_len * head_dim
    DK += head * seq_len * head_dim
    DV += head * seq_len * head_dim
    ROW_LOG += head * seq_len
    COL_LOG += head * seq_len
    GRAD_SCALE += head * seq_len
    ROW_SHIFT += head * seq_len

    offs_s = k_start + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_s < seq_len
    k = _load_tile(K, offs_s, offs_d, seq_len, head_dim)
    v = _load_tile(V, offs_s, offs_d, seq_len, head_dim)
    col_log = tl.load(COL_LOG + offs_s, mask=cols, other=float('-inf'))
    dk = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for q_start in range((k_start // BLOCK_Q) * BLOCK_Q, seq_len, BLOCK_Q):
        offs_t = q_start + tl.arange(0, BLOCK_Q)
        rows = offs_t < seq_len
        q = _load_tile(Q, offs_t, offs_d, seq_len, head_dim)
        grad_scale = tl.load(GRAD_SCALE + offs_t, mask=rows, other=0.0)
        scaled_grad = (_load_tile(GRAD_H, offs_t, offs_d, seq_len, head_dim) * grad_scale[:, None]).to(q.dtype)
        row_shift = tl.load(ROW_SHIFT + offs_t, mask=rows, other=0.0)
        row_log = tl.load(ROW_LOG + offs_t, mask=rows, other=0.0)
        # Transposed tiles (keys x queries), so that both updates are plain dots.
        decay_t = _causal_decay(row_log[None, :], offs_t[None, :], col_log[:, None], offs_s[:, None])
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale * decay_t
        grad_p_t = (tl.dot(v, tl.trans(scaled_grad), input_precision=DOT_PRECISION) + row_shift[None, :]) * decay_t
        dv += tl.dot(scores_t.to(q.dtype), scaled_grad, input_precision=DOT_PRECISION)
        dk += tl.dot(grad_p_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    _store_tile(DK, dk * scale, offs_s, offs_d, seq_len, head_dim)
    _store_tile(DV, dv, offs_s, offs_d, seq_len, head_dim)
