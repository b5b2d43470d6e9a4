"""Forward of the chunkwise Triton mLSTM: chunk states, then every chunk's outputs in parallel (three launches).

The matrix state after chunk c, C_c = sum_{s<=e_c} exp(logD[e_c,s] - m_{e_c}) k_s v_s^T, and the normaliser state
n_c (the same sum of k_s) obey C_c = exp(m_{c-1} - mu_e) C_{c-1} + exp(L_c - mu_e) S_c with the chunk's summary
S_c = sum_{s in c} exp(u_s - L_c) k_s v_s^T (scans.py: all three weights <= 1). So the heavy work is parallel over
chunks and only an elementwise recurrence walks them in order:

1. ``mlstm_chunk_summary_kernel``, one program per (chunk, key block, head): the chunk's gate scan, its own max L_c
   of u and the summaries S_c and sum_s exp(u_s - L_c) k_s, stored where C_c and n_c go. The key block 0 program
   also stores per step the chunk-local cumsum of the log forget gates and the in-chunk running max of u with its
   argmax, and per chunk L_c, its argmax and b at the last step.
2. ``mlstm_chunk_state_scan_kernel`` walks the chunks of a head in order, its matrix states split over programs of
   BLOCK_E elements: per chunk the max-plus step m_c = b_e + max(m_{c-1}, L_c) on two scalars and one multiply-add
   per element, turning each summary into C_c (stored in the input dtype for 16-bit inputs: ``state_dtype``).
   Nothing in that chain waits for memory (the loads are pipelined), so the launch is bandwidth-bound, not
   latency-bound. One more program per head does the same for n_c and stores m and its argmax at every chunk end
   and per step the row stabiliser mu and its argmax, so that no later kernel runs a scan. The states after the
   last chunk are never read: zeros (they are outputs of the op). The backward keeps all this (STATE_NAMES) instead
   of running launches 1 and 2 again: in bf16 DH x DH values per chunk of 64 steps are half its q, k and v (about
   0.9 GB for ViL-T at 2048 px, batch 2).
3. ``mlstm_chunk_output_kernel``, one program per (chunk, head), adds the in-chunk quadratic form to the previous
   chunk's state read by each query, and divides by the parallel form's normaliser max(|row sum|, exp(-m_t)) + eps.
   The row sums are kept for the backward. Scores are built once per chunk and reused for every value block.

All sums accumulate in float32 (float64 for float64 inputs); dot operands are the input dtype, except the summaries'
(state_dot).
"""
from typing import Dict, List

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..fused import _cuda_configs
from .scans import (causal_decay, chunk_end, chunk_key_max, chunk_stabiliser, gate_scan, row_stabiliser,
                    running_key_max)
from .tiles import (chunk_steps, dot, head_offset, jit_kernel, launch_options, load_state_tile, load_state_vector,
                    load_tokens, one_trip, state_block_ptrs, state_dot, state_offset, state_scan_block, store_tokens,
                    token_major_buffer, token_major_strides, token_strides)


# A summary program is short and latency-bound. With bfloat16 state products (tiles.state_dot) it takes about 100
# registers at 4 warps (ptxas, sm_90; 216 with 3xTF32 ones under Triton 3.6): five programs per SM. H100, bf16, B=2,
# NH=4, N=16384, DH=96: 92 us (191 with 3xTF32; 8 warps were slower, 0.38 ms then).
SUMMARY_LAUNCH = dict(num_warps=4)
# The scan walks the chunks in order: Triton pipelines only the loads of a loop with its own num_stages (not those of
# a plain range, which feed no tl.dot), so that the next chunks' summaries are already on their way. Same H100 case:
# 0.09 ms, 1.7 TB/s (0.07 at best over BLOCK_E 256-1024, 2-8 stages, 2-4 warps); at DH=192 0.22 ms, 2.8 TB/s (best).
SCAN_LAUNCH = dict(num_warps=4)
SCAN_STAGES = 4


@jit_kernel
def mlstm_chunk_summary_kernel(K, V, IGATE, FGATE, CUM, ROW_LOG, ARGMAX, STATE_C, STATE_N, CHUNK_LOCAL, CHUNK_ARGMAX,
                               stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                               stride_ib, stride_ih, stride_in, stride_fb, stride_fh, stride_fn,
                               seq_len, num_heads, num_chunks, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                               BLOCK_D: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                               DOT_IN_FLOAT32: tl.constexpr):
    """Launch 1 for one chunk, one key block and one head: the key block's rows of the chunk's summaries (all value
    blocks); the key block 0 program also stores the chunk's gate values. See the module docstring."""
    chunk = tl.program_id(0)
    key_start = tl.program_id(1) * BLOCK_D
    batch_head = tl.program_id(2)
    K += head_offset(batch_head, num_heads, stride_kb, stride_kh)
    V += head_offset(batch_head, num_heads, stride_vb, stride_vh)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    FGATE += head_offset(batch_head, num_heads, stride_fb, stride_fh)
    chunk_index = batch_head.to(tl.int64) * num_chunks + chunk
    ACC = STATE_C.dtype.element_ty

    steps, valid, positions = chunk_steps(chunk, seq_len, CHUNK, REVERSE)
    cum, key_log = gate_scan(IGATE, FGATE, positions, valid, stride_in, stride_fn)
    local_max, local_argmax = chunk_key_max(key_log, steps)
    if key_start == 0:
        rows = batch_head.to(tl.int64) * seq_len + steps
        run_max, run_argmax = running_key_max(key_log, steps)
        tl.store(CUM + rows, cum, mask=valid)
        tl.store(ROW_LOG + rows, run_max, mask=valid)  # the scan adds the earlier chunks
        tl.store(ARGMAX + rows, run_argmax, mask=valid)
        tl.store(CHUNK_LOCAL + 2 * chunk_index, local_max)
        tl.store(CHUNK_LOCAL + 2 * chunk_index + 1, tl.min(cum, 0))  # b at the last step: cum does not increase
        tl.store(CHUNK_ARGMAX + chunk_index, local_argmax)  # the scan replaces it by the argmax of m
    if chunk < num_chunks - 1:  # nothing reads the state after the last chunk
        k = load_tokens(K, positions, valid, key_start, stride_kn, HEAD_DIM, BLOCK_D)
        weighted_k = k.to(ACC) * tl.exp((key_log - local_max).to(ACC))[:, None]
        state_c = STATE_C + state_offset(batch_head, chunk, num_chunks, HEAD_DIM)
        for value_start in range(0, HEAD_DIM, BLOCK_D):
            v = load_tokens(V, positions, valid, value_start, stride_vn, HEAD_DIM, BLOCK_D)
            summary = state_dot(tl.trans(weighted_k), v, tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC), DOT_PRECISION,
                                DOT_IN_FLOAT32)
            ptrs, mask = state_block_ptrs(state_c, key_start, value_start, HEAD_DIM, BLOCK_D)
            tl.store(ptrs, summary, mask=mask)
        offs_key = key_start + tl.arange(0, BLOCK_D)
        tl.store(STATE_N + chunk_index * HEAD_DIM + offs_key, tl.sum(weighted_k, 0), mask=offs_key < HEAD_DIM)


@triton.jit
def rescaled_state(state, summary, prev_max, local_max, end_row_log):
    """C_c = exp(m_{c-1} - mu_e) C_{c-1} + exp(L_c - mu_e) S_c, both weights <= 1 (the first 0 in the first chunk,
    whose C_{c-1} is the initial 0)."""
    ACC = state.dtype
    return state * tl.exp((prev_max - end_row_log).to(ACC)) + summary * tl.exp((local_max - end_row_log).to(ACC))


@jit_kernel
def mlstm_chunk_state_scan_kernel(ROW_LOG, ARGMAX, SUMMARY_C, STATE_C, STATE_N, CHUNK_LOCAL, CHUNK_MAX, CHUNK_ARGMAX,
                                  seq_len, num_chunks, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                                  BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """Launch 2 for one tile of BLOCK_E elements of the matrix states of one head, walking the chunks in order and
    turning each summary into the state (stored in STATE_C's dtype; STATE_C may be SUMMARY_C); the program after the
    last tile takes the normaliser states, m and its argmax at the chunk ends and the per-step row stabiliser
    instead. See the module docstring."""
    tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    chunk_ends = batch_head.to(tl.int64) * num_chunks
    if tile < (HEAD_DIM * HEAD_DIM + BLOCK_E - 1) // BLOCK_E:
        offs = tile * BLOCK_E + tl.arange(0, BLOCK_E)
        states = state_offset(batch_head, 0, num_chunks, HEAD_DIM) + offs
        scan_matrix_states(SUMMARY_C + states, STATE_C + states, offs < HEAD_DIM * HEAD_DIM,
                           CHUNK_LOCAL + 2 * chunk_ends, num_chunks, HEAD_DIM, STAGES)
    else:
        rows = batch_head.to(tl.int64) * seq_len
        scan_gates(ROW_LOG + rows, ARGMAX + rows, STATE_N + chunk_ends * HEAD_DIM, CHUNK_LOCAL + 2 * chunk_ends,
                   CHUNK_MAX + chunk_ends, CHUNK_ARGMAX + chunk_ends, seq_len, num_chunks, HEAD_DIM, CHUNK,
                   BLOCK_N, STAGES)


@triton.jit
def scan_matrix_states(summaries, states, in_state, CHUNK_LOCAL, num_chunks, HEAD_DIM: tl.constexpr,
                       STAGES: tl.constexpr):
    """One tile of the matrix states after every chunk but the last from the chunks' summaries (pointers into the
    first chunk's); the running state stays in the summaries' dtype, what is stored takes that of ``states``."""
    state = tl.zeros(summaries.shape, dtype=summaries.dtype.element_ty)
    prev_max = tl.full([], float('-inf'), tl.float64)
    for chunk in tl.range(0, num_chunks - 1, num_stages=STAGES):  # nothing reads the state after the last chunk
        local_max = tl.load(CHUNK_LOCAL + 2 * chunk)
        end_max, _, end_row_log = chunk_end(local_max, 0, tl.load(CHUNK_LOCAL + 2 * chunk + 1), prev_max, 0)
        offset = chunk * HEAD_DIM * HEAD_DIM
        state = rescaled_state(state, tl.load(summaries + offset, mask=in_state, other=0.0), prev_max, local_max,
                               end_row_log)
        tl.store(states + offset, state.to(states.dtype.element_ty), mask=in_state)
        prev_max = end_max
    # Nothing reads the state after the last chunk, but the states are outputs of the op (kept for the backward):
    # zeros there, not whatever the memory held (torch.library.opcheck compares outputs between runs).
    tl.store(states + (num_chunks - 1) * HEAD_DIM * HEAD_DIM, tl.zeros_like(state).to(states.dtype.element_ty),
             mask=in_state)


@triton.jit
def scan_gates(ROW_LOG, ARGMAX, STATE_N, CHUNK_LOCAL, CHUNK_MAX, CHUNK_ARGMAX, seq_len, num_chunks,
               HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """m and its argmax at every chunk end and the per-step row stabiliser and argmax (in place over the in-chunk
    running max), and the normaliser states in place over their summaries, for one head."""
    offs_key = tl.arange(0, BLOCK_N)
    norm = tl.zeros((BLOCK_N,), dtype=STATE_N.dtype.element_ty)
    prev_max = tl.full([], float('-inf'), tl.float64)
    prev_argmax = tl.full([], 0, tl.int32)
    for chunk in tl.range(0, num_chunks, num_stages=STAGES):
        local_max = tl.load(CHUNK_LOCAL + 2 * chunk)
        end_max, end_argmax, end_row_log = chunk_end(local_max, tl.load(CHUNK_ARGMAX + chunk),
                                                     tl.load(CHUNK_LOCAL + 2 * chunk + 1), prev_max, prev_argmax)
        steps = chunk * CHUNK + tl.arange(0, CHUNK)
        valid = steps < seq_len
        row_log, argmax = row_stabiliser(tl.load(ROW_LOG + steps, mask=valid, other=float('-inf')),
                                         tl.load(ARGMAX + steps, mask=valid, other=0), prev_max, prev_argmax)
        tl.store(ROW_LOG + steps, row_log, mask=valid)
        tl.store(ARGMAX + steps, argmax, mask=valid)
        has_reader = chunk < num_chunks - 1  # zeros after the last chunk, as the matrix states
        norms = STATE_N + chunk * HEAD_DIM + offs_key
        norm = rescaled_state(norm, tl.load(norms, mask=(offs_key < HEAD_DIM) & has_reader, other=0.0), prev_max,
                              local_max, end_row_log)
        tl.store(norms, tl.where(has_reader, norm, 0.0), mask=offs_key < HEAD_DIM)
        tl.store(CHUNK_MAX + chunk, end_max)
        tl.store(CHUNK_ARGMAX + chunk, end_argmax)
        prev_max = end_max
        prev_argmax = end_argmax


@jit_kernel
def mlstm_chunk_output_kernel(Q, K, V, IGATE, CUM, ROW_LOG, ARGMAX, STATE_C, STATE_N, CHUNK_MAX, H, ROW_SUM,
                              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                              stride_vb, stride_vh, stride_vn, stride_ib, stride_ih, stride_in,
                              stride_hb, stride_hh, stride_hn,
                              seq_len, num_heads, num_chunks, SCALE: tl.constexpr, eps, HEAD_DIM: tl.constexpr,
                              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, STATE_BLOCK: tl.constexpr,
                              REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """h of one chunk of one head (all head-dim blocks) and its row sums; see the module docstring. STATE_BLOCK: the
    key block of the state product (tiles.py). SCALE = 1/sqrt(HEAD_DIM) is a compile-time constant here and in the
    backward, so that it takes the dtype of the scores: a float argument is float32 on the GPU, which cost float64
    runs seven digits (H100, 2026-12-07)."""
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
    ACC = STATE_N.dtype.element_ty  # the matrix states may be stored in the input dtype

    steps, valid, positions = chunk_steps(chunk, seq_len, CHUNK, REVERSE)
    steps_offset = batch_head.to(tl.int64) * seq_len
    cum, key_log, row_log, _, _, prev_max = chunk_stabiliser(
        IGATE, CUM + steps_offset, ROW_LOG + steps_offset, ARGMAX + steps_offset, CHUNK_MAX + chunk_ends, chunk,
        steps, positions, valid, stride_in, CHUNK)
    decay = causal_decay(key_log, row_log, steps, False, ACC)
    state_weight = tl.exp((prev_max - row_log).to(ACC)) * SCALE  # 0 in the first chunk

    has_state = chunk > 0
    scores = tl.zeros((CHUNK, CHUNK), dtype=ACC)
    query_dot_norm = tl.zeros((CHUNK,), dtype=ACC)
    for d_start in range(0, HEAD_DIM, BLOCK_D):
        q = load_tokens(Q, positions, valid, d_start, stride_qn, HEAD_DIM, BLOCK_D)
        k = load_tokens(K, positions, valid, d_start, stride_kn, HEAD_DIM, BLOCK_D)
        scores = dot(q, tl.trans(k), scores, DOT_PRECISION, DOT_IN_FLOAT32)
        norm = load_state_vector(prev_state_n, d_start, has_state, HEAD_DIM, BLOCK_D)
        query_dot_norm += tl.sum(q.to(ACC) * norm[None, :], 1)
    weights = scores * SCALE * decay
    row_sum = tl.sum(weights, 1) + state_weight * query_dot_norm
    divisor = tl.maximum(tl.abs(row_sum), tl.exp((-(cum + row_log)).to(ACC))) + eps
    weights = weights.to(Q.dtype.element_ty)

    # Earlier keys come through the previous chunk's state (none before the first chunk: a loop bound, not a
    # branch, so the accumulator keeps one register layout), with the queries pre-scaled by its weight.
    state_end = tl.where(has_state, HEAD_DIM, 0)
    if STATE_BLOCK >= HEAD_DIM:  # one key block: weighted once for all value blocks
        weighted_q = (load_tokens(Q, positions, valid, 0, stride_qn, HEAD_DIM, STATE_BLOCK).to(ACC)
                      * state_weight[:, None]).to(Q.dtype.element_ty)
    for value_start in range(0, HEAD_DIM, BLOCK_D):
        v = load_tokens(V, positions, valid, value_start, stride_vn, HEAD_DIM, BLOCK_D)
        acc = tl.zeros((CHUNK, BLOCK_D), dtype=ACC)
        for once in range(0, one_trip(seq_len)):  # a chained dot (tiles.one_trip)
            acc = dot(weights, v, acc, DOT_PRECISION, DOT_IN_FLOAT32)
        for key_start in range(0, state_end, STATE_BLOCK):
            if STATE_BLOCK < HEAD_DIM:
                q = load_tokens(Q, positions, valid, key_start, stride_qn, HEAD_DIM, STATE_BLOCK)
                weighted_q = (q.to(ACC) * state_weight[:, None]).to(q.dtype)
            state = load_state_tile(prev_state_c, key_start, value_start, HEAD_DIM, STATE_BLOCK, BLOCK_D)
            acc = dot(weighted_q, state.to(Q.dtype.element_ty), acc, DOT_PRECISION, DOT_IN_FLOAT32)
        store_tokens(H, acc / divisor[:, None], positions, valid, value_start, stride_hn, HEAD_DIM, BLOCK_D)
    tl.store(ROW_SUM + steps_offset + steps, row_sum, mask=valid)


# What the forward keeps for the backward besides h and the row sums (chunk_states' buffers, in this order), so that
# the backward does not run launches 1 and 2 again.
STATE_NAMES = ('cum', 'row_log', 'argmax', 'state_c', 'state_n', 'chunk_max', 'chunk_argmax')


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stored matrix states (and reverse states) of inputs of ``dtype``: 16-bit inputs' in their own dtype, as the
    products read them (each kernel rounded its float32 tile so before: the same results, half the traffic and the
    memory kept for the backward), others in the accumulation dtype. The scans carry them in the accumulation dtype."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.promote_types(dtype, torch.float32)


def chunk_states(k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, config: dict) -> Dict[str, Tensor]:
    """Launches 1 and 2: the matrix and normaliser states after every chunk but the last, m and its argmax at every
    chunk end, and per step the local cumsum of the log forget gates, the row log stabiliser and the argmax
    (scans.py); the keys of STATE_NAMES."""
    batch, heads, n, head_dim = k.shape
    num_chunks = triton.cdiv(n, config['CHUNK'])
    acc_dtype = torch.promote_types(k.dtype, torch.float32)
    heads_total = batch * heads
    summaries = torch.empty(heads_total, num_chunks, head_dim, head_dim, dtype=acc_dtype, device=k.device)
    out = dict(
        cum=torch.empty(heads_total, n, dtype=torch.float64, device=k.device),
        row_log=torch.empty(heads_total, n, dtype=torch.float64, device=k.device),
        argmax=torch.empty(heads_total, n, dtype=torch.int32, device=k.device),
        state_c=summaries if state_dtype(k.dtype) == acc_dtype else summaries.new_empty(
            summaries.shape, dtype=state_dtype(k.dtype)),
        state_n=torch.empty(heads_total, num_chunks, head_dim, dtype=acc_dtype, device=k.device),
        chunk_max=torch.empty(heads_total, num_chunks, dtype=torch.float64, device=k.device),
        chunk_argmax=torch.empty(heads_total, num_chunks, dtype=torch.int32, device=k.device))
    chunk_local = torch.empty(heads_total, num_chunks, 2, dtype=torch.float64, device=k.device)  # L_c and b_e
    summary = launch_options(config, 'summary', **SUMMARY_LAUNCH)
    mlstm_chunk_summary_kernel[(num_chunks, triton.cdiv(head_dim, summary['BLOCK_D']), heads_total)](
        k, v, igate, fgate, out['cum'], out['row_log'], out['argmax'], summaries, out['state_n'], chunk_local,
        out['chunk_argmax'], *token_strides(k), *token_strides(v), *token_strides(igate), *token_strides(fgate), n,
        heads, num_chunks, **summary)
    scan = scan_options(config, 'scan')
    mlstm_chunk_state_scan_kernel[(triton.cdiv(head_dim * head_dim, scan['BLOCK_E']) + 1, heads_total)](
        out['row_log'], out['argmax'], summaries, out['state_c'], out['state_n'], chunk_local, out['chunk_max'],
        out['chunk_argmax'], n, num_chunks, CHUNK=config['CHUNK'], BLOCK_N=triton.next_power_of_2(head_dim), **scan)
    return out


def scan_options(config: dict, kernel: str) -> dict:
    """HEAD_DIM, BLOCK_E, STAGES and warps of a scan over chunks, ``kernel`` 'scan' (launch 2) or 'grad_scan' (the
    backward's), with the call's launch overrides (op.LAUNCH_ENV)."""
    return launch_options(config, kernel, shared=('HEAD_DIM',), STAGES=SCAN_STAGES, **SCAN_LAUNCH,
                          BLOCK_E=state_scan_block(config['HEAD_DIM'], interpreted=not _cuda_configs()))


def forward(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float, config: dict
            ) -> List[Tensor]:
    """h as a ``(B, N, NH, DH)`` buffer, the row sums ``(B*NH, N)`` and the chunk states (STATE_NAMES): what the
    backward needs."""
    batch, heads, n, head_dim = q.shape
    gates = chunk_states(k, v, igate, fgate, config)
    h = token_major_buffer((batch, n, heads, head_dim), q)
    row_sum = torch.empty(batch * heads, n, dtype=gates['state_n'].dtype, device=q.device)
    num_chunks = gates['chunk_max'].shape[1]
    mlstm_chunk_output_kernel[(num_chunks, batch * heads)](
        q, k, v, igate, gates['cum'], gates['row_log'], gates['argmax'], gates['state_c'], gates['state_n'],
        gates['chunk_max'], h, row_sum, *token_strides(q), *token_strides(k), *token_strides(v),
        *token_strides(igate), *token_major_strides(h), n, heads, num_chunks, 1 / head_dim ** 0.5, eps,
        **launch_options(config, 'output', STATE_BLOCK=config['BLOCK_D'], **output_launch(q.dtype, config['CHUNK'])))
    return [h, row_sum, *(gates[name] for name in STATE_NAMES)]


def output_launch(dtype: torch.dtype, chunk_size: int) -> dict:
    """The output kernel's register cap: for 16-bit inputs at chunk 64 it fits 80 registers per thread without
    spills (ptxas, sm_90, bf16, Triton 3.6 and 3.8; 114 uncapped), three programs of 8 warps per SM instead of two
    (H100, ViL-T at 2048 px, batch 2: 132 -> 111 us); other dtypes and chunks would spill under that cap."""
    return dict(maxnreg=80) if dtype in (torch.float16, torch.bfloat16) and chunk_size == 64 else {}
