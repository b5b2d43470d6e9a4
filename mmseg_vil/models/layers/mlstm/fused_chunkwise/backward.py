"""Backward of the chunkwise Triton mLSTM: the parallel cell's exact gradients in five launches.

The gradient itself is derived in ``fused.py``: with g_t = dL/dh_t, the divisor d_t = max(|r_t|, exp(-m_t)) + eps,
delta_t = g_t.h_t, the row shift beta_t (through the normaliser's |r| branch) and the direct m-gradient
gm_t = -delta_t eps / d_t, every pair (t, s <= t) contributes G[t,s] W[t,s] with G[t,s] = g_t.v_s / d_t + beta_t and
W[t,s] = exp(logD[t,s] - m_t):

    dq_t = sc sum_s G W k_s,    dk_s = sc sum_t G W q_t,    dv_s = sc sum_t (q_t.k_s) W g_t / d_t   (sc = DH^-1/2)

Launches:
1. The forward's ``forward.chunk_states`` (kept, not recomputed): C_c, n_c (for dq's earlier keys), m and its
   argmax at every chunk end, and the per-step gate values (local cumsum, row stabiliser, argmax).
2. ``mlstm_chunk_grad_prep_kernel`` (per chunk): 1/d_t, beta_t, gm_t, and per chunk the sum of gm_t over the rows
   whose argmax s*_t lies in an earlier chunk (that s* is always the previous chunk end's argmax).
3. The reverse states dC_j = sum_{t > e_j} exp(M_e - M_t) q_t (g_t/d_t)^T and dn_j = sum_{t > e_j} exp(M_e - M_t)
   beta_t q_t (e = e_j, scans.py), which every key of chunk j reads with its state weight exp(u_s - mu_e) (for dk,
   dv). They obey dC_{c-1} = exp(m_{c-1} - mu_e) dC_c + sum_{t in c} exp(m_{c-1} - mu_t) q_t (g_t/d_t)^T (e the last
   step of chunk c), whose weights are all known after launch 1, so ``mlstm_chunk_grad_summary_kernel`` builds the
   sums per chunk in parallel and ``mlstm_chunk_grad_state_scan_kernel`` walks the boundaries backwards with one
   multiply-add per element, its states split over many programs as in the forward's scan. The scan also stores
   its tiles' parts of <dC_j, C_j> + <dn_j, n_j>: that is sum_{t > e_j >= s} dL/dlogD[t,s] / sc, which is exactly
   the forget-gate gradient at the first step of chunk j+1 without the m-gradient.
4. ``mlstm_chunk_grad_query_kernel`` (per chunk): dq (in-chunk quadratic form + the previous chunk's state) and the
   row sums of dL/dlogD, q_t.dq_t + gm_t.
5. ``mlstm_chunk_grad_key_kernel`` (per chunk): dk, dv (in-chunk + the reverse state) and the column sums
   k_s.dk_s + sum_{t: s*_t = s} gm_t, then the gate gradients: di = column sum, and
   dlog f_r = sum_{t >= r} (row - column sum) = in-chunk reverse cumsum + the crossing sum of launch 3 + the
   m-gradients of later rows whose argmax lies at or before this chunk. The argmax targets of later chunks are
   looked up in the per-chunk arrays of launches 1 and 2, so nothing is scattered with atomics and the result is
   deterministic. dfgate = dlog f * sigmoid(-fgate). dv and dk (with the gates) are two programs per chunk
   (SPLIT_DK_DV, grid axis 2; the same operations in the same order as one program doing both): each holds one
   (CHUNK, CHUNK) tile, about 120 registers instead of 190 at 8 warps (ptxas, sm_90, bf16, DH=96, chunk 64), so two
   programs fit an SM where one did, and there are twice as many. With WITH_DQ (a launch option, op.LAUNCH_ENV) the
   dk program also computes dq from the same weighted gradient scores (transposed: launch 4's scores without
   launch 4's loads and products) and takes the row sums from there; launch 4 is then skipped. 128 registers at 8
   warps with num_stages=1 (197 with 2).
Splitting dq from dk/dv keeps each kernel's live tiles few enough to stay in registers.
"""
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .forward import STATE_NAMES, SUMMARY_LAUNCH, scan_options
from .scans import causal_decay, chunk_stabiliser
from .tiles import (chunk_steps, dot, head_offset, jit_kernel, launch_options, load_state_tile, load_state_vector,
                    load_tokens, one_trip, state_block_ptrs, state_dot, state_offset, store_tokens,
                    token_major_buffer, token_major_strides, token_strides)


# One stage for the grad-key kernel: its state tiles are 16-bit dot operands for 16-bit inputs, which Triton 3.8
# otherwise pipelines through shared memory: 178 registers at 8 warps, one program per SM, against 109 (ptxas, sm_90,
# bf16, chunk 64; Triton 3.6: 128 and 126). Its loops are three head-dim blocks long: little to prefetch.
KEY_STAGES = 1


@jit_kernel
def mlstm_chunk_grad_prep_kernel(GRAD_H, H, IGATE, CUM, ROW_LOG, ARGMAX, ROW_SUM, CHUNK_MAX, INV_DIVISOR,
                                 ROW_SHIFT, GRAD_M, STATE_GRAD_M, stride_gb, stride_gh, stride_gn, stride_hb, stride_hh,
                                 stride_hn, stride_ib, stride_ih, stride_in, seq_len, num_heads, num_chunks, eps,
                                 HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                                 REVERSE: tl.constexpr):
    """Per row of one chunk: 1/d_t, beta_t, gm_t; per chunk: the gm_t of rows whose argmax is in an earlier chunk."""
    chunk = tl.program_id(0)
    batch_head = tl.program_id(1)
    GRAD_H += head_offset(batch_head, num_heads, stride_gb, stride_gh)
    H += head_offset(batch_head, num_heads, stride_hb, stride_hh)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    chunk_ends = batch_head.to(tl.int64) * num_chunks
    steps_offset = batch_head.to(tl.int64) * seq_len
    ACC = ROW_SUM.dtype.element_ty

    steps, valid, positions = chunk_steps(chunk, seq_len, CHUNK, REVERSE)
    cum, _, row_log, _, from_state, _ = chunk_stabiliser(
        IGATE, CUM + steps_offset, ROW_LOG + steps_offset, ARGMAX + steps_offset, CHUNK_MAX + chunk_ends, chunk,
        steps, positions, valid, stride_in, CHUNK)
    delta = tl.zeros((CHUNK,), dtype=ACC)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        grad_h = load_tokens(GRAD_H, positions, valid, d_start, stride_gn, HEAD_DIM, BLOCK_D)
        h = load_tokens(H, positions, valid, d_start, stride_hn, HEAD_DIM, BLOCK_D)
        delta += tl.sum(grad_h.to(ACC) * h.to(ACC), 1)

    rows = steps_offset + steps
    row_sum = tl.load(ROW_SUM + rows, mask=valid, other=0.0)
    norm_floor = tl.exp((-(cum + row_log)).to(ACC))
    divisor = tl.maximum(tl.abs(row_sum), norm_floor) + eps
    sign = tl.where(row_sum > 0, 1.0, tl.where(row_sum < 0, -1.0, 0.0))
    grad_m = -delta * eps / divisor
    tl.store(INV_DIVISOR + rows, 1 / divisor, mask=valid)
    tl.store(ROW_SHIFT + rows, tl.where(tl.abs(row_sum) > norm_floor, -delta / divisor * sign, 0.0), mask=valid)
    tl.store(GRAD_M + rows, grad_m, mask=valid)
    tl.store(STATE_GRAD_M + chunk_ends + chunk, tl.sum(tl.where(valid & from_state, grad_m, 0.0), 0))


@triton.jit
def query_rows(IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, INV_DIVISOR, ROW_SHIFT, chunk, chunk_ends, steps_offset,
               seq_len, stride_in, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """What a chunk's queries need in the backward: their steps, mask and positions, the key log weights u, the row
    log stabiliser mu, m at the previous chunk's end, and 1/d_t and beta_t from the prep launch."""
    steps, valid, positions = chunk_steps(chunk, seq_len, CHUNK, REVERSE)
    _, key_log, row_log, _, _, prev_max = chunk_stabiliser(
        IGATE, CUM + steps_offset, ROW_LOG + steps_offset, ARGMAX + steps_offset, CHUNK_MAX + chunk_ends, chunk,
        steps, positions, valid, stride_in, CHUNK)
    rows = steps_offset + steps
    return (steps, valid, positions, key_log, row_log, prev_max, tl.load(INV_DIVISOR + rows, mask=valid, other=0.0),
            tl.load(ROW_SHIFT + rows, mask=valid, other=0.0))


@jit_kernel
def mlstm_chunk_grad_summary_kernel(Q, GRAD_H, IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, INV_DIVISOR, ROW_SHIFT,
                                    GRAD_STATE_C, GRAD_STATE_N, stride_qb, stride_qh, stride_qn,
                                    stride_gb, stride_gh, stride_gn, stride_ib, stride_ih, stride_in,
                                    seq_len, num_heads, num_chunks, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                                    BLOCK_D: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                    DOT_IN_FLOAT32: tl.constexpr):
    """Step 3's sums for one chunk c > 0, one key block and one head: the key block's rows of what the queries of
    chunk c add to the reverse states at the boundary before it (all value blocks), stored where the scan turns them
    into those states. See the module docstring."""
    chunk = tl.program_id(0) + 1
    key_start = tl.program_id(1) * BLOCK_D
    batch_head = tl.program_id(2)
    Q += head_offset(batch_head, num_heads, stride_qb, stride_qh)
    GRAD_H += head_offset(batch_head, num_heads, stride_gb, stride_gh)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    chunk_ends = batch_head.to(tl.int64) * num_chunks
    steps_offset = batch_head.to(tl.int64) * seq_len
    ACC = GRAD_STATE_C.dtype.element_ty

    steps, valid, positions, _, row_log, prev_max, inv_divisor, shift = query_rows(
        IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, INV_DIVISOR, ROW_SHIFT, chunk, chunk_ends, steps_offset, seq_len,
        stride_in, CHUNK, REVERSE)
    q = load_tokens(Q, positions, valid, key_start, stride_qn, HEAD_DIM, BLOCK_D).to(ACC)
    row_weight = tl.exp((prev_max - row_log).to(ACC))
    # 1/d_t goes with the query's row weight, so that the gradient rows enter the product as they are (state_dot).
    weighted_q = tl.trans(q * (row_weight * inv_divisor)[:, None])
    grad_state_c = GRAD_STATE_C + state_offset(batch_head, chunk - 1, num_chunks, HEAD_DIM)
    for value_start in range(0, HEAD_DIM, BLOCK_D):
        grad_h = load_tokens(GRAD_H, positions, valid, value_start, stride_gn, HEAD_DIM, BLOCK_D)
        summary = state_dot(weighted_q, grad_h, tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC), DOT_PRECISION,
                            DOT_IN_FLOAT32)
        ptrs, mask = state_block_ptrs(grad_state_c, key_start, value_start, HEAD_DIM, BLOCK_D)
        tl.store(ptrs, summary, mask=mask)
    offs_key = key_start + tl.arange(0, BLOCK_D)
    tl.store(GRAD_STATE_N + (chunk_ends + chunk - 1) * HEAD_DIM + offs_key,
             tl.sum(q * (row_weight * shift)[:, None], 0), mask=offs_key < HEAD_DIM)


@jit_kernel
def mlstm_chunk_grad_state_scan_kernel(ROW_LOG, CHUNK_MAX, STATE_C, STATE_N, GRAD_SUMMARY_C, GRAD_STATE_C,
                                       GRAD_STATE_N, CROSSING, seq_len, num_chunks, HEAD_DIM: tl.constexpr,
                                       CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                                       STAGES: tl.constexpr):
    """Step 3's scan for one tile of BLOCK_E elements of the reverse matrix states of one head, or (the program after
    the last tile) its reverse normaliser states: walks the boundaries backwards, turning each summary into the state
    (the matrix states stored in GRAD_STATE_C's dtype, GRAD_STATE_C may be GRAD_SUMMARY_C; the normaliser states in
    place), and stores that tile's part of the crossing inner products. See the module docstring."""
    tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    NUM_TILES: tl.constexpr = (HEAD_DIM * HEAD_DIM + BLOCK_E - 1) // BLOCK_E
    chunk_ends = batch_head.to(tl.int64) * num_chunks
    crossing = CROSSING + chunk_ends * (NUM_TILES + 1) + tile
    row_log = ROW_LOG + batch_head.to(tl.int64) * seq_len
    # Names bound in both branches must have one type, so each branch has its own.
    if tile < NUM_TILES:
        offs_e = tile * BLOCK_E + tl.arange(0, BLOCK_E)
        states = state_offset(batch_head, 0, num_chunks, HEAD_DIM) + offs_e
        scan_reverse_states(GRAD_SUMMARY_C + states, GRAD_STATE_C + states, STATE_C + states,
                            offs_e < HEAD_DIM * HEAD_DIM, HEAD_DIM * HEAD_DIM, crossing, row_log,
                            CHUNK_MAX + chunk_ends, seq_len, num_chunks, CHUNK, NUM_TILES + 1, STAGES)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        norms = chunk_ends * HEAD_DIM + offs_n
        scan_reverse_states(GRAD_STATE_N + norms, GRAD_STATE_N + norms, STATE_N + norms, offs_n < HEAD_DIM,
                            HEAD_DIM, crossing, row_log, CHUNK_MAX + chunk_ends, seq_len, num_chunks, CHUNK,
                            NUM_TILES + 1, STAGES)


@triton.jit
def scan_reverse_states(summaries, grads, states, mask, stride, crossing, ROW_LOG, CHUNK_MAX, seq_len, num_chunks,
                        CHUNK: tl.constexpr, NUM_PARTIALS: tl.constexpr, STAGES: tl.constexpr):
    """dX_j = exp(m_j - mu_e) dX_{j+1} + (chunk j+1's summary) for the boundaries j backwards, with e the last step of
    chunk j+1 (the weight <= 1 that carries the reverse state over that chunk), from the summaries at ``summaries``
    into ``grads`` (in its dtype; the running state stays in the summaries'); and sum(dX_j * X_j) over this part of
    the forward states ``states``."""
    grad = tl.zeros(summaries.shape, dtype=summaries.dtype.element_ty)
    for index in tl.range(0, num_chunks - 1, num_stages=STAGES):
        boundary = num_chunks - 2 - index
        end_row_log = tl.load(ROW_LOG + tl.minimum(boundary * CHUNK + 2 * CHUNK, seq_len) - 1)  # mu does not decrease
        carry = tl.exp((tl.load(CHUNK_MAX + boundary) - end_row_log).to(grad.dtype))
        grad = grad * carry + tl.load(summaries + boundary * stride, mask=mask, other=0.0)
        tl.store(grads + boundary * stride, grad.to(grads.dtype.element_ty), mask=mask)
        state = tl.load(states + boundary * stride, mask=mask, other=0.0).to(grad.dtype)
        tl.store(crossing + boundary * NUM_PARTIALS, tl.sum(grad * state, 0))


@jit_kernel
def mlstm_chunk_grad_query_kernel(Q, K, V, GRAD_H, IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, INV_DIVISOR, ROW_SHIFT,
                                  GRAD_M, STATE_C, STATE_N, DQ, ROW_TOTAL, stride_qb, stride_qh, stride_qn,
                                  stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                  stride_gb, stride_gh, stride_gn, stride_ib, stride_ih, stride_in,
                                  stride_ob, stride_oh, stride_on, seq_len, num_heads, num_chunks, SCALE: tl.constexpr,
                                  HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                                  STATE_BLOCK: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                  DOT_IN_FLOAT32: tl.constexpr):
    """dq of one chunk of one head and its rows' sums of dL/dlogD, q_t.dq_t + gm_t (launch 4). STATE_BLOCK: the
    value block of the state product (tiles.py)."""
    chunk = tl.program_id(0)
    batch_head = tl.program_id(1)
    Q += head_offset(batch_head, num_heads, stride_qb, stride_qh)
    K += head_offset(batch_head, num_heads, stride_kb, stride_kh)
    V += head_offset(batch_head, num_heads, stride_vb, stride_vh)
    GRAD_H += head_offset(batch_head, num_heads, stride_gb, stride_gh)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    DQ += head_offset(batch_head, num_heads, stride_ob, stride_oh)
    chunk_ends = batch_head.to(tl.int64) * num_chunks
    steps_offset = batch_head.to(tl.int64) * seq_len
    ACC = STATE_N.dtype.element_ty  # the matrix states may be stored in the input dtype
    IN = Q.dtype.element_ty

    steps, valid, positions, key_log, row_log, prev_max, inv_divisor, shift = query_rows(
        IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, INV_DIVISOR, ROW_SHIFT, chunk, chunk_ends, steps_offset, seq_len,
        stride_in, CHUNK, REVERSE)
    rows = steps_offset + steps

    grad_scores = tl.zeros((CHUNK, CHUNK), dtype=ACC)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        grad_h = load_tokens(GRAD_H, positions, valid, d_start, stride_gn, HEAD_DIM, BLOCK_D)
        v = load_tokens(V, positions, valid, d_start, stride_vn, HEAD_DIM, BLOCK_D)
        grad_scores = dot((grad_h.to(ACC) * inv_divisor[:, None]).to(IN), tl.trans(v), grad_scores, DOT_PRECISION,
                          DOT_IN_FLOAT32)
    grad_weights = ((grad_scores + shift[:, None]) * causal_decay(key_log, row_log, steps, False, ACC)
                    * SCALE).to(IN)

    row_total = chunk_grad_queries(grad_weights, Q, K, GRAD_H, GRAD_M, STATE_C, STATE_N, DQ, chunk, chunk_ends,
                                   batch_head, num_chunks, positions, valid, rows, row_log, prev_max, inv_divisor,
                                   shift, SCALE, stride_qn, stride_kn, stride_gn, stride_on, HEAD_DIM, CHUNK, BLOCK_D,
                                   STATE_BLOCK, DOT_PRECISION, DOT_IN_FLOAT32)
    tl.store(ROW_TOTAL + rows, row_total, mask=valid)



@triton.jit
def chunk_grad_queries(grad_weights, Q, K, GRAD_H, GRAD_M, STATE_C, STATE_N, DQ, chunk, chunk_ends, batch_head,
                       num_chunks, positions, valid, rows, row_log, prev_max, inv_divisor, shift, SCALE: tl.constexpr,
                       stride_qn, stride_kn, stride_gn, stride_on, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_D: tl.constexpr, STATE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       DOT_IN_FLOAT32: tl.constexpr):
    """dq of one chunk's queries from their weighted gradient scores ``grad_weights`` (rows t, columns s: sc G W),
    plus the earlier keys through the previous chunk's state; returns the rows' sums of dL/dlogD, q_t.dq_t + gm_t."""
    ACC = STATE_N.dtype.element_ty  # the matrix states may be stored in the input dtype
    IN = Q.dtype.element_ty
    prev_state_c = STATE_C + state_offset(batch_head, chunk - 1, num_chunks, HEAD_DIM)
    prev_state_n = STATE_N + (chunk_ends + chunk - 1) * HEAD_DIM
    state_weight = tl.exp((prev_max - row_log).to(ACC)) * SCALE  # 0 in the first chunk
    # Earlier keys through the previous chunk's state (a loop bound, not a branch: see the forward's output kernel),
    # rows pre-scaled by its weight.
    has_state = chunk > 0
    state_end = tl.where(has_state, HEAD_DIM, 0)
    row_total = tl.load(GRAD_M + rows, mask=valid, other=0.0)
    if STATE_BLOCK >= HEAD_DIM:  # one value block: weighted once for all key blocks
        weighted_grad = (load_tokens(GRAD_H, positions, valid, 0, stride_gn, HEAD_DIM, STATE_BLOCK).to(ACC)
                         * (inv_divisor * state_weight)[:, None]).to(IN)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        k = load_tokens(K, positions, valid, d_start, stride_kn, HEAD_DIM, BLOCK_D)
        dq = tl.zeros((CHUNK, BLOCK_D), dtype=ACC)
        for once in range(0, one_trip(num_chunks)):  # a chained dot (tiles.one_trip)
            dq = dot(grad_weights, k, dq, DOT_PRECISION, DOT_IN_FLOAT32)
        for value_start in range(0, state_end, STATE_BLOCK):
            if STATE_BLOCK < HEAD_DIM:
                grad_h = load_tokens(GRAD_H, positions, valid, value_start, stride_gn, HEAD_DIM, STATE_BLOCK)
                weighted_grad = (grad_h.to(ACC) * (inv_divisor * state_weight)[:, None]).to(IN)
            state = load_state_tile(prev_state_c, d_start, value_start, HEAD_DIM, BLOCK_D, STATE_BLOCK)
            dq = dot(weighted_grad, tl.trans(state.to(IN)), dq, DOT_PRECISION, DOT_IN_FLOAT32)
        norm = load_state_vector(prev_state_n, d_start, has_state, HEAD_DIM, BLOCK_D)
        dq += (shift * state_weight)[:, None] * norm[None, :]
        q = load_tokens(Q, positions, valid, d_start, stride_qn, HEAD_DIM, BLOCK_D)
        row_total += tl.sum(q.to(ACC) * dq, 1)
        store_tokens(DQ, dq, positions, valid, d_start, stride_on, HEAD_DIM, BLOCK_D)
    return row_total


@jit_kernel
def mlstm_chunk_grad_key_kernel(Q, K, V, GRAD_H, IGATE, FGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, CHUNK_ARGMAX,
                                INV_DIVISOR, ROW_SHIFT, GRAD_M, ROW_TOTAL, STATE_GRAD_M, GRAD_STATE_C, GRAD_STATE_N,
                                CROSSING, STATE_C, STATE_N, DQ,
                                DK, DV, DIGATE, DFGATE, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                                stride_kn, stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gn,
                                stride_ib, stride_ih, stride_in, stride_fb, stride_fh, stride_fn,
                                stride_pb, stride_ph, stride_pn,
                                stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                                seq_len, num_heads, num_chunks, SCALE: tl.constexpr, HEAD_DIM: tl.constexpr,
                                CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
                                NUM_CROSSING: tl.constexpr, BLOCK_CROSSING: tl.constexpr, SPLIT_DK_DV: tl.constexpr,
                                STATE_BLOCK: tl.constexpr, WITH_DQ: tl.constexpr,
                                REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """dk, dv and the gate gradients of one chunk of one head (launch 5). dv first, then dk and the gates, so that
    one (CHUNK, CHUNK) tile is live at a time; with SPLIT_DK_DV the two halves are programs of their own (grid axis
    2: 0 dv, 1 dk and the gates) that run side by side. Tiles are key-major (rows s, columns t), so the sums over
    queries need no transposed tiles. WITH_DQ: dq too (with dk, from the same weighted gradient scores, transposed)
    instead of the grad-query kernel (launch 4), and the gates from its row sums without a round trip."""
    chunk = tl.program_id(0)
    batch_head = tl.program_id(1)
    Q += head_offset(batch_head, num_heads, stride_qb, stride_qh)
    K += head_offset(batch_head, num_heads, stride_kb, stride_kh)
    V += head_offset(batch_head, num_heads, stride_vb, stride_vh)
    GRAD_H += head_offset(batch_head, num_heads, stride_gb, stride_gh)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    FGATE += head_offset(batch_head, num_heads, stride_fb, stride_fh)
    DK += head_offset(batch_head, num_heads, stride_ob, stride_oh)
    DV += head_offset(batch_head, num_heads, stride_ob, stride_oh)
    DQ += head_offset(batch_head, num_heads, stride_pb, stride_ph)
    DIGATE += head_offset(batch_head, num_heads, stride_db, stride_dh)
    DFGATE += head_offset(batch_head, num_heads, stride_db, stride_dh)
    chunk_ends = batch_head.to(tl.int64) * num_chunks
    steps_offset = batch_head.to(tl.int64) * seq_len
    grad_state_c = GRAD_STATE_C + state_offset(batch_head, chunk, num_chunks, HEAD_DIM)
    grad_state_n = GRAD_STATE_N + (chunk_ends + chunk) * HEAD_DIM
    has_next = chunk < num_chunks - 1

    # Later queries come through the reverse state after this chunk (none after the last: a loop bound, not a
    # branch). Each half reads the chunk's gate values itself, so that none stay live through the other.
    state_end = tl.where(has_next, HEAD_DIM, 0)
    values_here, keys_here = True, True  # one program does both, or (SPLIT_DK_DV) programs 0 and 1 of grid axis 2
    if SPLIT_DK_DV:
        values_here = tl.program_id(2) == 0
        keys_here = tl.program_id(2) == 1
    if values_here:
        chunk_grad_values(Q, K, GRAD_H, IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, INV_DIVISOR, grad_state_c, DV,
                          chunk, chunk_ends, steps_offset, seq_len, state_end, SCALE, stride_qn, stride_kn,
                          stride_gn, stride_in, stride_on, HEAD_DIM, CHUNK, BLOCK_D, STATE_BLOCK, REVERSE,
                          DOT_PRECISION, DOT_IN_FLOAT32)
    if keys_here:
        chunk_grad_keys(Q, K, V, GRAD_H, IGATE, FGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, CHUNK_ARGMAX,
                        INV_DIVISOR, ROW_SHIFT, GRAD_M, ROW_TOTAL, STATE_GRAD_M, grad_state_c, grad_state_n,
                        CROSSING, STATE_C, STATE_N, DQ, DK, DIGATE, DFGATE, chunk, num_chunks, chunk_ends,
                        steps_offset, batch_head, seq_len, state_end, has_next, SCALE, stride_qn, stride_kn,
                        stride_vn, stride_gn, stride_in, stride_fn, stride_pn, stride_on, stride_dn, HEAD_DIM,
                        CHUNK, BLOCK_D, STATE_BLOCK, BLOCK_CHUNKS, NUM_CROSSING, BLOCK_CROSSING, WITH_DQ,
                        REVERSE, DOT_PRECISION, DOT_IN_FLOAT32)


@triton.jit
def key_chunk(IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, chunk, chunk_ends, steps_offset, seq_len, stride_in,
              SCALE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """What a chunk's keys need in the backward: their steps, mask, positions and rows of the per-step buffers, the
    gate values of ``chunk_stabiliser`` and the keys' weights in the chunk's state (times sc; 0 past the end), and m at
    the previous chunk's end."""
    steps, valid, positions = chunk_steps(chunk, seq_len, CHUNK, REVERSE)
    _, key_log, row_log, argmax, from_state, prev_max = chunk_stabiliser(
        IGATE, CUM + steps_offset, ROW_LOG + steps_offset, ARGMAX + steps_offset, CHUNK_MAX + chunk_ends, chunk,
        steps, positions, valid, stride_in, CHUNK)
    end_row_log = tl.max(tl.where(valid, row_log, float('-inf')), 0)
    key_weight = tl.exp((key_log - end_row_log).to(ACC)) * SCALE
    return (steps, valid, positions, steps_offset + steps, key_log, row_log, argmax, from_state, key_weight,
            prev_max)


@triton.jit
def chunk_grad_values(Q, K, GRAD_H, IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, INV_DIVISOR, grad_state_c, DV, chunk,
                      chunk_ends, steps_offset, seq_len, state_end, SCALE: tl.constexpr, stride_qn, stride_kn,
                      stride_gn, stride_in, stride_on, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_D: tl.constexpr, STATE_BLOCK: tl.constexpr, REVERSE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """dv of one chunk's keys: sc sum_t (q_t.k_s) W[t,s] g_t / d_t over the chunk's queries, plus the keys
    (pre-scaled by their state weight) times the reverse state after the chunk."""
    ACC = INV_DIVISOR.dtype.element_ty  # the reverse states may be stored in the input dtype
    IN = Q.dtype.element_ty
    steps, valid, positions, rows, key_log, row_log, _, _, key_weight, _ = key_chunk(
        IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, chunk, chunk_ends, steps_offset, seq_len, stride_in, SCALE, ACC,
        CHUNK, REVERSE)
    inv_divisor = tl.load(INV_DIVISOR + rows, mask=valid, other=0.0)
    scores = tl.zeros((CHUNK, CHUNK), dtype=ACC)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        q = load_tokens(Q, positions, valid, d_start, stride_qn, HEAD_DIM, BLOCK_D)
        k = load_tokens(K, positions, valid, d_start, stride_kn, HEAD_DIM, BLOCK_D)
        scores = dot(k, tl.trans(q), scores, DOT_PRECISION, DOT_IN_FLOAT32)
    weights = (scores * (causal_decay(key_log, row_log, steps, True, ACC) * SCALE)).to(IN)
    if STATE_BLOCK >= HEAD_DIM:  # one key block: weighted once for all value blocks
        weighted_k = (load_tokens(K, positions, valid, 0, stride_kn, HEAD_DIM, STATE_BLOCK).to(ACC)
                      * key_weight[:, None]).to(IN)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        grad_h = load_tokens(GRAD_H, positions, valid, d_start, stride_gn, HEAD_DIM, BLOCK_D)
        dv = tl.zeros((CHUNK, BLOCK_D), dtype=ACC)
        for once in range(0, one_trip(seq_len)):  # a chained dot (tiles.one_trip)
            dv = dot(weights, (grad_h.to(ACC) * inv_divisor[:, None]).to(IN), dv, DOT_PRECISION, DOT_IN_FLOAT32)
        for key_start in range(0, state_end, STATE_BLOCK):
            if STATE_BLOCK < HEAD_DIM:
                k = load_tokens(K, positions, valid, key_start, stride_kn, HEAD_DIM, STATE_BLOCK)
                weighted_k = (k.to(ACC) * key_weight[:, None]).to(IN)
            state = load_state_tile(grad_state_c, key_start, d_start, HEAD_DIM, STATE_BLOCK, BLOCK_D)
            dv = dot(weighted_k, state.to(IN), dv, DOT_PRECISION, DOT_IN_FLOAT32)
        store_tokens(DV, dv, positions, valid, d_start, stride_on, HEAD_DIM, BLOCK_D)


@triton.jit
def chunk_grad_keys(Q, K, V, GRAD_H, IGATE, FGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, CHUNK_ARGMAX, INV_DIVISOR,
                    ROW_SHIFT, GRAD_M, ROW_TOTAL, STATE_GRAD_M, grad_state_c, grad_state_n, CROSSING, STATE_C, STATE_N,
                    DQ, DK, DIGATE, DFGATE, chunk, num_chunks, chunk_ends, steps_offset, batch_head, seq_len,
                    state_end, has_next, SCALE: tl.constexpr, stride_qn, stride_kn, stride_vn, stride_gn, stride_in,
                    stride_fn, stride_pn, stride_on, stride_dn, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_D: tl.constexpr, STATE_BLOCK: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
                    NUM_CROSSING: tl.constexpr, BLOCK_CROSSING: tl.constexpr, WITH_DQ: tl.constexpr,
                    REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """dk of one chunk's keys: sc sum_t G[t,s] W[t,s] q_t over the chunk's queries, plus the values and the shift
    (pre-scaled by the keys' state weight) through the reverse states after the chunk; then the gate gradients from
    the column sums k_s.dk_s (``chunk_gate_grads``)."""
    ACC = grad_state_n.dtype.element_ty
    IN = Q.dtype.element_ty
    steps, valid, positions, rows, key_log, row_log, argmax, from_state, key_weight, prev_max = key_chunk(
        IGATE, CUM, ROW_LOG, ARGMAX, CHUNK_MAX, chunk, chunk_ends, steps_offset, seq_len, stride_in, SCALE, ACC,
        CHUNK, REVERSE)
    inv_divisor = tl.load(INV_DIVISOR + rows, mask=valid, other=0.0)
    shift = tl.load(ROW_SHIFT + rows, mask=valid, other=0.0)
    grad_scores = tl.zeros((CHUNK, CHUNK), dtype=ACC)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        v = load_tokens(V, positions, valid, d_start, stride_vn, HEAD_DIM, BLOCK_D)
        grad_h = load_tokens(GRAD_H, positions, valid, d_start, stride_gn, HEAD_DIM, BLOCK_D)
        grad_scores = dot(v, tl.trans((grad_h.to(ACC) * inv_divisor[:, None]).to(IN)), grad_scores, DOT_PRECISION,
                          DOT_IN_FLOAT32)
    grad_weights = ((grad_scores + shift[None, :]) * (causal_decay(key_log, row_log, steps, True, ACC) * SCALE)
                    ).to(IN)
    column_total = tl.zeros((CHUNK,), dtype=ACC)
    if STATE_BLOCK >= HEAD_DIM:  # one value block: weighted once for all key blocks
        weighted_v = (load_tokens(V, positions, valid, 0, stride_vn, HEAD_DIM, STATE_BLOCK).to(ACC)
                      * key_weight[:, None]).to(IN)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        q = load_tokens(Q, positions, valid, d_start, stride_qn, HEAD_DIM, BLOCK_D)
        dk = tl.zeros((CHUNK, BLOCK_D), dtype=ACC)
        for once in range(0, one_trip(seq_len)):  # a chained dot (tiles.one_trip)
            dk = dot(grad_weights, q, dk, DOT_PRECISION, DOT_IN_FLOAT32)
        for value_start in range(0, state_end, STATE_BLOCK):
            if STATE_BLOCK < HEAD_DIM:
                v = load_tokens(V, positions, valid, value_start, stride_vn, HEAD_DIM, STATE_BLOCK)
                weighted_v = (v.to(ACC) * key_weight[:, None]).to(IN)
            state = load_state_tile(grad_state_c, d_start, value_start, HEAD_DIM, BLOCK_D, STATE_BLOCK)
            dk = dot(weighted_v, tl.trans(state.to(IN)), dk, DOT_PRECISION, DOT_IN_FLOAT32)
        grad_norm = load_state_vector(grad_state_n, d_start, has_next, HEAD_DIM, BLOCK_D)
        dk += key_weight[:, None] * grad_norm[None, :]
        k = load_tokens(K, positions, valid, d_start, stride_kn, HEAD_DIM, BLOCK_D)
        column_total += tl.sum(k.to(ACC) * dk, 1)
        store_tokens(DK, dk, positions, valid, d_start, stride_on, HEAD_DIM, BLOCK_D)
    if WITH_DQ:
        row_total = chunk_grad_queries(tl.trans(grad_weights), Q, K, GRAD_H, GRAD_M, STATE_C, STATE_N, DQ, chunk,
                                       chunk_ends, batch_head, num_chunks, positions, valid, rows, row_log, prev_max,
                                       inv_divisor, shift, SCALE, stride_qn, stride_kn, stride_gn, stride_pn,
                                       HEAD_DIM, CHUNK, BLOCK_D, STATE_BLOCK, DOT_PRECISION, DOT_IN_FLOAT32)
    else:
        row_total = tl.load(ROW_TOTAL + rows, mask=valid, other=0.0)
    chunk_gate_grads(column_total, row_total, FGATE, CHUNK_ARGMAX, GRAD_M, STATE_GRAD_M, CROSSING, DIGATE, DFGATE,
                     chunk, num_chunks, chunk_ends, steps, valid, positions, rows, argmax, from_state, has_next,
                     SCALE, stride_fn, stride_dn, CHUNK, BLOCK_CHUNKS, NUM_CROSSING, BLOCK_CROSSING)


@triton.jit
def chunk_gate_grads(column_total, row_total, FGATE, CHUNK_ARGMAX, GRAD_M, STATE_GRAD_M, CROSSING, DIGATE, DFGATE,
                     chunk, num_chunks, chunk_ends, steps, valid, positions, rows, argmax, from_state, has_next,
                     SCALE: tl.constexpr, stride_fn, stride_dn, CHUNK: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
                     NUM_CROSSING: tl.constexpr, BLOCK_CROSSING: tl.constexpr):
    """The gate gradients of one chunk from the column sums k_s.dk_s and the row sums q_t.dq_t + gm_t: di = column
    total, dlog f = reverse cumsum of (row - column totals) + the crossing sum; see the module docstring."""
    ACC = column_total.dtype
    # m_t = logD[t, s*_t]: gm_t also belongs to column s*_t, here if s*_t is in this chunk ...
    grad_m = tl.load(GRAD_M + rows, mask=valid, other=0.0)
    in_chunk = valid & (from_state == 0)
    column_total += tl.sum(tl.where((argmax[:, None] == steps[None, :]) & in_chunk[:, None], grad_m[:, None], 0.0), 0)
    # ... or from the rows of later chunks whose argmax is a chunk end's (launch 2's per-chunk sums).
    last_step = chunk * CHUNK + CHUNK - 1
    crossing = tl.zeros((1,), dtype=ACC)
    later_start = chunk + 1
    more = later_start < num_chunks
    while more:
        later = later_start + tl.arange(0, BLOCK_CHUNKS)
        exists = later < num_chunks
        later_grad_m = tl.load(STATE_GRAD_M + chunk_ends + later, mask=exists, other=0.0)
        target = tl.load(CHUNK_ARGMAX + chunk_ends + later - 1, mask=exists, other=-1)
        column_total += tl.sum(tl.where(target[None, :] == steps[:, None], later_grad_m[None, :], 0.0), 1)
        crossing += tl.sum(tl.where(target <= last_step, later_grad_m, 0.0), 0)
        later_start += BLOCK_CHUNKS
        # The targets do not decrease with the chunk (the argmax of the running max M only moves forward): past the
        # first one beyond this chunk, later chunks add nothing here (the blocks they would add are all zeros).
        more = (later_start < num_chunks) & (tl.max(tl.where(exists, target, -1), 0) <= last_step)
    if has_next:
        offs = tl.arange(0, BLOCK_CROSSING)
        partials = tl.load(CROSSING + (chunk_ends + chunk) * NUM_CROSSING + offs, mask=offs < NUM_CROSSING,
                           other=0.0)
        crossing += tl.sum(partials, 0) * SCALE
    grad_log_f = tl.cumsum(tl.where(valid, row_total - column_total, 0.0), 0, reverse=True) + crossing
    fgate = tl.load(FGATE + positions * stride_fn, mask=valid, other=0.0)
    if fgate.dtype != tl.float64:
        fgate = fgate.to(tl.float32)
    gate_positions = positions * stride_dn
    tl.store(DIGATE + gate_positions, column_total.to(DIGATE.dtype.element_ty), mask=valid)
    tl.store(DFGATE + gate_positions, (grad_log_f * tl.sigmoid(-fgate).to(ACC)).to(DFGATE.dtype.element_ty),
             mask=valid)


def backward(grad_h: Tensor, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, h: Tensor,
             stats: Sequence[Tensor], eps: float, config: dict, out: Optional[Sequence[Tensor]] = None
             ) -> List[Tensor]:
    """Gradients of q, k, v as ``(B, N, NH, DH)`` buffers and of igate, fgate as ``(B, N, NH)`` buffers: ``out`` if
    given (any strides with a unit head-dim stride for dq, dk, dv), else fresh ones.

    ``grad_h`` and ``h`` are ``(B, N, NH, DH)`` (any strides with a unit head-dim stride), ``stats`` the forward's row
    sums and chunk states (forward.STATE_NAMES).
    """
    batch, heads, n, head_dim = q.shape
    row_sum, *states = stats
    gates = dict(zip(STATE_NAMES, states))
    steps = (gates['cum'], gates['row_log'], gates['argmax'])  # per-step gate values of scans.py
    state_c, state_n, chunk_max = gates['state_c'], gates['state_n'], gates['chunk_max']
    num_chunks = chunk_max.shape[1]
    grid = (num_chunks, batch * heads)
    token_args = (*token_strides(q), *token_strides(k), *token_strides(v), *token_major_strides(grad_h),
                  *token_strides(igate))
    scale = 1 / head_dim ** 0.5
    inv_divisor, row_shift, grad_m, row_total = (torch.empty_like(row_sum) for _ in range(4))
    state_grad_m = torch.empty(batch * heads, num_chunks, dtype=row_sum.dtype, device=q.device)
    prep_config = launch_options(config, 'grad_prep', shared=('HEAD_DIM', 'CHUNK', 'BLOCK_D', 'REVERSE', 'num_warps'))
    mlstm_chunk_grad_prep_kernel[grid](
        grad_h, h, igate, *steps, row_sum, chunk_max, inv_divisor, row_shift, grad_m, state_grad_m,
        *token_major_strides(grad_h), *token_major_strides(h), *token_strides(igate), n, heads, num_chunks, eps,
        **prep_config)

    grad_summary_c, grad_state_n = torch.empty_like(state_c, dtype=state_n.dtype), torch.empty_like(state_n)
    grad_state_c = grad_summary_c if state_c.dtype == state_n.dtype else torch.empty_like(state_c)
    scan = scan_options(config, 'grad_scan')
    scan_tiles = triton.cdiv(head_dim * head_dim, scan['BLOCK_E']) + 1  # and the normaliser's
    crossing = torch.empty(batch * heads, num_chunks, scan_tiles, dtype=state_n.dtype, device=q.device)
    if num_chunks > 1:  # else no boundary has a reverse state
        summary = launch_options(config, 'grad_summary', **SUMMARY_LAUNCH)
        mlstm_chunk_grad_summary_kernel[(num_chunks - 1, triton.cdiv(head_dim, summary['BLOCK_D']), batch * heads)](
            q, grad_h, igate, *steps, chunk_max, inv_divisor, row_shift, grad_summary_c, grad_state_n,
            *token_strides(q), *token_major_strides(grad_h), *token_strides(igate), n, heads, num_chunks, **summary)
        mlstm_chunk_grad_state_scan_kernel[(scan_tiles, batch * heads)](
            gates['row_log'], chunk_max, state_c, state_n, grad_summary_c, grad_state_c, grad_state_n, crossing, n,
            num_chunks, CHUNK=config['CHUNK'], BLOCK_N=triton.next_power_of_2(head_dim), **scan)

    dq, dk, dv, d_igate, d_fgate = out or (*(token_major_buffer((batch, n, heads, head_dim), q) for _ in range(3)),
                                           token_major_buffer((batch, n, heads), igate),
                                           token_major_buffer((batch, n, heads), fgate))
    if dk.stride() != dv.stride() or d_igate.stride() != d_fgate.stride():  # the key kernel takes one set of each
        raise ValueError(f'dk, dv strides {dk.stride()}, {dv.stride()} or d_igate, d_fgate strides '
                         f'{d_igate.stride()}, {d_fgate.stride()} differ')
    key_options = launch_options(config, 'grad_key', SPLIT_DK_DV=True, STATE_BLOCK=config['BLOCK_D'], WITH_DQ=False,
                                 BLOCK_CHUNKS=64, num_stages=KEY_STAGES)
    if not key_options['WITH_DQ']:
        mlstm_chunk_grad_query_kernel[grid](
            q, k, v, grad_h, igate, *steps, chunk_max, inv_divisor, row_shift, grad_m, state_c, state_n, dq,
            row_total, *token_args, *token_major_strides(dq), n, heads, num_chunks, scale,
            **launch_options(config, 'grad_query', STATE_BLOCK=config['BLOCK_D']))
    mlstm_chunk_grad_key_kernel[(*grid, 2 if key_options['SPLIT_DK_DV'] else 1)](
        q, k, v, grad_h, igate, fgate, *steps, chunk_max, gates['chunk_argmax'], inv_divisor, row_shift, grad_m,
        row_total, state_grad_m, grad_state_c, grad_state_n, crossing, state_c, state_n, dq, dk, dv, d_igate,
        d_fgate, *token_args, *token_strides(fgate), *token_major_strides(dq), *token_major_strides(dk),
        *token_major_strides(d_igate), n, heads, num_chunks, scale,
        NUM_CROSSING=scan_tiles, BLOCK_CROSSING=triton.next_power_of_2(scan_tiles), **key_options)
    return [dq, dk, dv, d_igate, d_fgate]
