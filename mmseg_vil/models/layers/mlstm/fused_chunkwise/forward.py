"""Forward of the chunkwise Triton mLSTM: chunk states, then every chunk's outputs in parallel (two launches).

1. ``mlstm_chunk_state_kernel`` walks the chunks of a head in order, one program per (key block, value block, head),
   and stores after every chunk c the matrix state C_c = sum_{s<=e_c} exp(logD[e_c,s] - m_{e_c}) k_s v_s^T, the
   normaliser state n_c (the same sum of k_s) and m at the chunk end with its argmax; its first program per head
   also stores per step the chunk-local cumsum of the log forget gates, the row stabiliser mu and the argmax
   (scans.py), so that no later kernel runs a scan. The backward recomputes all this instead of keeping it: DH x DH
   floats per chunk would outweigh q, k and v.
2. ``mlstm_chunk_output_kernel``, one program per (chunk, head), adds the in-chunk quadratic form to the previous
   chunk's state read by each query, and divides by the parallel form's normaliser max(|row sum|, exp(-m_t)) + eps.
   The row sums are kept for the backward. Scores are built once per chunk and reused for every value block.

All sums accumulate in float32 (float64 for float64 inputs); dot operands are the input dtype.
"""
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .scans import causal_decay, chunk_end, chunk_stabiliser, gate_scan, row_stabiliser
from .tiles import (chunk_steps, dot, head_offset, jit_kernel, load_state_block, load_state_vector, load_tokens,
                    state_block_ptrs, state_dot, state_offset, store_tokens, token_major_buffer, token_major_strides,
                    token_strides)


# The state kernels walk the chunks in order, so their time is latency: several pipeline stages prefetch the next
# chunk's tiles. 8 warps keep their float32 (3xTF32) operands free of spills.
STATE_LAUNCH = dict(num_warps=8, num_stages=3)


@jit_kernel
def mlstm_chunk_state_kernel(K, V, IGATE, FGATE, CUM, ROW_LOG, ARGMAX, STATE_C, STATE_N, CHUNK_MAX, CHUNK_ARGMAX,
                             stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                             stride_ib, stride_ih, stride_in, stride_fb, stride_fh, stride_fn,
                             seq_len, num_heads, num_chunks, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                             BLOCK_D: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             DOT_IN_FLOAT32: tl.constexpr):
    """States after every chunk for one (key block, value block) of one head; the first program of each head also
    stores the per-step gate values of scans.py (local cumsum, row stabiliser, argmax). See the module docstring."""
    key_start = tl.program_id(0) * BLOCK_D
    value_start = tl.program_id(1) * BLOCK_D
    batch_head = tl.program_id(2)
    K += head_offset(batch_head, num_heads, stride_kb, stride_kh)
    V += head_offset(batch_head, num_heads, stride_vb, stride_vh)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    FGATE += head_offset(batch_head, num_heads, stride_fb, stride_fh)
    STATE_C += state_offset(batch_head, 0, num_chunks, HEAD_DIM)
    STATE_N += batch_head.to(tl.int64) * num_chunks * HEAD_DIM
    CHUNK_MAX += batch_head.to(tl.int64) * num_chunks
    CHUNK_ARGMAX += batch_head.to(tl.int64) * num_chunks
    CUM += batch_head.to(tl.int64) * seq_len
    ROW_LOG += batch_head.to(tl.int64) * seq_len
    ARGMAX += batch_head.to(tl.int64) * seq_len
    ACC = STATE_C.dtype.element_ty
    stores_gates = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    offs_key = key_start + tl.arange(0, BLOCK_D)

    state = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    norm = tl.zeros((BLOCK_D,), dtype=ACC)
    prev_max = tl.full([], float('-inf'), tl.float64)
    prev_argmax = tl.full([], 0, tl.int32)
    for chunk in range(0, num_chunks):
        steps, valid, positions = chunk_steps(chunk, seq_len, CHUNK, REVERSE)
        cum, key_log = gate_scan(IGATE, FGATE, positions, valid, stride_in, stride_fn)
        if stores_gates:
            row_log, argmax = row_stabiliser(key_log, steps, prev_max, prev_argmax)
            tl.store(CUM + steps, cum, mask=valid)
            tl.store(ROW_LOG + steps, row_log, mask=valid)
            tl.store(ARGMAX + steps, argmax, mask=valid)
        end_max, end_argmax, end_row_log = chunk_end(cum, key_log, steps, prev_max, prev_argmax)
        carry = tl.exp((prev_max - end_row_log).to(ACC))
        k = load_tokens(K, positions, valid, key_start, stride_kn, HEAD_DIM, BLOCK_D)
        v = load_tokens(V, positions, valid, value_start, stride_vn, HEAD_DIM, BLOCK_D)
        weighted_k = k.to(ACC) * tl.exp((key_log - end_row_log).to(ACC))[:, None]
        state = state_dot(tl.trans(weighted_k), v.to(ACC), state * carry)
        norm = norm * carry + tl.sum(weighted_k, 0)

        has_reader = chunk < num_chunks - 1  # nothing reads the state after the last chunk
        ptrs, mask = state_block_ptrs(STATE_C + chunk * HEAD_DIM * HEAD_DIM, key_start, value_start, HEAD_DIM,
                                      BLOCK_D)
        tl.store(ptrs, state, mask=mask & has_reader)
        tl.store(STATE_N + chunk * HEAD_DIM + offs_key, norm,
                 mask=(offs_key < HEAD_DIM) & (value_start == 0) & has_reader)
        tl.store(CHUNK_MAX + chunk, end_max, mask=stores_gates)
        tl.store(CHUNK_ARGMAX + chunk, end_argmax, mask=stores_gates)
        prev_max = end_max
        prev_argmax = end_argmax


@jit_kernel
def mlstm_chunk_output_kernel(Q, K, V, IGATE, CUM, ROW_LOG, ARGMAX, STATE_C, STATE_N, CHUNK_MAX, H, ROW_SUM,
                              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                              stride_vb, stride_vh, stride_vn, stride_ib, stride_ih, stride_in,
                              stride_hb, stride_hh, stride_hn,
                              seq_len, num_heads, num_chunks, scale, eps, HEAD_DIM: tl.constexpr,
                              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, REVERSE: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """h of one chunk of one head (all head-dim blocks) and its row sums; see the module docstring."""
    chunk = tl.program_id(0)
    batch_head = tl.program_id(1)
    Q += head_offset(batch_head, num_heads, stride_qb, stride_qh)
    K += head_offset(batch_head, num_heads, stride_kb, stride_kh)
    V += head_offset(batch_head, num_heads, stride_vb, stride_vh)
    H += head_offset(batch_head, num_heads, stride_hb, stride_hh)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    prev_state_c = STATE_C + state_offset(batch_head, chunk - 1, num_chunks, HEAD_DIM)
    prev_state_n = STATE_N + (batch_head.to(tl.int64) * num_chunks + chunk - 1) * HEAD_DIM
    chunk_ends = batch_head.to(tl.int64) * num_chunks
    ACC = STATE_C.dtype.element_ty

    steps, valid, positions = chunk_steps(chunk, seq_len, CHUNK, REVERSE)
    steps_offset = batch_head.to(tl.int64) * seq_len
    cum, key_log, row_log, _, _, prev_max = chunk_stabiliser(
        IGATE, CUM + steps_offset, ROW_LOG + steps_offset, ARGMAX + steps_offset, CHUNK_MAX + chunk_ends, chunk,
        steps, positions, valid, stride_in, CHUNK)
    decay = causal_decay(key_log, row_log, steps, False, ACC)
    state_weight = tl.exp((prev_max - row_log).to(ACC)) * scale  # 0 in the first chunk

    has_state = chunk > 0
    scores = tl.zeros((CHUNK, CHUNK), dtype=ACC)
    query_dot_norm = tl.zeros((CHUNK,), dtype=ACC)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        q = load_tokens(Q, positions, valid, d_start, stride_qn, HEAD_DIM, BLOCK_D)
        k = load_tokens(K, positions, valid, d_start, stride_kn, HEAD_DIM, BLOCK_D)
        scores = dot(q, tl.trans(k), scores, DOT_PRECISION, DOT_IN_FLOAT32)
        norm = load_state_vector(prev_state_n, d_start, has_state, HEAD_DIM, BLOCK_D)
        query_dot_norm += tl.sum(q.to(ACC) * norm[None, :], 1)
    weights = scores * scale * decay
    row_sum = tl.sum(weights, 1) + state_weight * query_dot_norm
    divisor = tl.maximum(tl.abs(row_sum), tl.exp((-(cum + row_log)).to(ACC))) + eps
    weights = weights.to(Q.dtype.element_ty)

    # Earlier keys come through the previous chunk's state (none before the first chunk: a loop bound, not a
    # branch, so the accumulator keeps one register layout), with the queries pre-scaled by its weight.
    state_end = tl.where(has_state, HEAD_DIM, 0)
    for value_start in range(0, HEAD_DIM, BLOCK_D):
        v = load_tokens(V, positions, valid, value_start, stride_vn, HEAD_DIM, BLOCK_D)
        acc = dot(weights, v, tl.zeros((CHUNK, BLOCK_D), dtype=ACC), DOT_PRECISION, DOT_IN_FLOAT32)
        for key_start in range(0, state_end, BLOCK_D):
            q = load_tokens(Q, positions, valid, key_start, stride_qn, HEAD_DIM, BLOCK_D)
            weighted_q = (q.to(ACC) * state_weight[:, None]).to(q.dtype)
            state = load_state_block(prev_state_c, key_start, value_start, HEAD_DIM, BLOCK_D)
            acc = dot(weighted_q, state.to(q.dtype), acc, DOT_PRECISION, DOT_IN_FLOAT32)
        store_tokens(H, acc / divisor[:, None], positions, valid, value_start, stride_hn, HEAD_DIM, BLOCK_D)
    tl.store(ROW_SUM + steps_offset + steps, row_sum, mask=valid)


def chunk_states(k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, config: dict) -> Dict[str, Tensor]:
    """One launch: the matrix and normaliser states after every chunk, m and its argmax at every chunk end, and per
    step the local cumsum of the log forget gates, the row log stabiliser and the argmax (scans.py)."""
    batch, heads, n, head_dim = k.shape
    num_chunks = triton.cdiv(n, config['CHUNK'])
    acc_dtype = torch.promote_types(k.dtype, torch.float32)
    heads_total = batch * heads
    out = dict(
        cum=torch.empty(heads_total, n, dtype=torch.float64, device=k.device),
        row_log=torch.empty(heads_total, n, dtype=torch.float64, device=k.device),
        argmax=torch.empty(heads_total, n, dtype=torch.int32, device=k.device),
        state_c=torch.empty(heads_total, num_chunks, head_dim, head_dim, dtype=acc_dtype, device=k.device),
        state_n=torch.empty(heads_total, num_chunks, head_dim, dtype=acc_dtype, device=k.device),
        chunk_max=torch.empty(heads_total, num_chunks, dtype=torch.float64, device=k.device),
        chunk_argmax=torch.empty(heads_total, num_chunks, dtype=torch.int32, device=k.device))
    blocks = triton.cdiv(head_dim, config['BLOCK_D'])
    mlstm_chunk_state_kernel[(blocks, blocks, heads_total)](
        k, v, igate, fgate, out['cum'], out['row_log'], out['argmax'], out['state_c'], out['state_n'],
        out['chunk_max'], out['chunk_argmax'], *token_strides(k), *token_strides(v), *token_strides(igate),
        *token_strides(fgate), n, heads, num_chunks, **{**config, **STATE_LAUNCH})
    return out


def forward(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float, config: dict
            ) -> Tuple[Tensor, Tensor]:
    """h as a ``(B, N, NH, DH)`` buffer and the row sums ``(B*NH, N)`` the backward needs."""
    batch, heads, n, head_dim = q.shape
    gates = chunk_states(k, v, igate, fgate, config)
    h = token_major_buffer((batch, n, heads, head_dim), q)
    row_sum = torch.empty(batch * heads, n, dtype=gates['state_c'].dtype, device=q.device)
    num_chunks = gates['chunk_max'].shape[1]
    mlstm_chunk_output_kernel[(num_chunks, batch * heads)](
        q, k, v, igate, gates['cum'], gates['row_log'], gates['argmax'], gates['state_c'], gates['state_n'],
        gates['chunk_max'], h, row_sum, *token_strides(q), *token_strides(k), *token_strides(v),
        *token_strides(igate), *token_major_strides(h), n, heads, num_chunks, 1 / head_dim ** 0.5, eps, **config)
    return h, row_sum
