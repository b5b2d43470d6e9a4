"""Triton kernels of the fused mLSTM backend (``fused.py`` derives the math they implement).

Forward and all three backward products have one shape, so one tile kernel computes them all:

    out[a] = sum over causal pairs b of  (x_a . y_b + shift_t) * scale * exp(logD[t,s] - m_t) * z_b

    forward:  a = query t, b = key s <= t,  x = q, y = k, z = v          (then divided by the normaliser)
    dq:       a = query t, b = key s <= t,  x = g/divisor, y = v, z = k,  shift = row shift
    dk:       a = key s,   b = query t >= s, x = v, y = g/divisor, z = q,  shift = row shift
    dv:       a = key s,   b = query t >= s, x = k, y = q, z = g/divisor

Flash-attention style: a program owns a tile of rows a (and all or a slice of z's columns) and walks the causal tiles
b, so no N x N matrix is stored. dk and dv walk the same pairs with the same decay, one's y being the other's z, so one
launch can compute both (DUAL: x2 = k beside x = v). Query-major tiles end at the last step, so that the partial
tile is the one that walks the fewest keys. The stabiliser m is known up front (a cummax, computed outside), so
unlike softmax attention no running rescaling is needed: the stabilised decay is ``exp(row_log[t] + col_log[s])``
with ``row_log = F - m`` and ``col_log = i - F``. Both are large (|F| grows with N) while their sum is small, so in
float32 each comes as a pair ``hi + lo``: hi + hi cancels exactly and lo + lo restores the digits float32 would lose
(in float64, for exact reference runs, hi is the value itself and lo is 0).

Head dims come in power-of-two chunks of at least 16 (the smallest ``tl.dot``), unpadded: a head that one chunk and
a tail chunk cover (96 = 64 + 32, 192 = 128 + 64) is held whole, its own x tile loaded once (like flash attention's
Q) and all output columns in one program, in two accumulators; larger heads (ViL-B: 384 = 3 x 128) walk the x.y dot
chunk by chunk and split the output into slices of BLOCK_DZ (a grid axis), so that they need no more registers than
small ones. Only head dims below 16 and tails that are no power of two are padded (masked).

Layout. Every ``(B, NH, N, DH)`` operand (q, k, v, h, the output gradient, dq, dk, dv) and ``(B, NH, N)`` gate is read
and written through its own (batch, head, token[, dim]) strides, so the ViL mixer's views of one projection output are
read in place and each output goes to the layout its consumer reads best. The kernels walk scan steps t: step t is
token t, or token N-1-t when REVERSE (the anti-causal cell of ViL's odd blocks), so the reversed cell is the same
computation at other addresses, with no flipped copies. The per-step values passed between the kernels (logs, norm
floor, row sums, argmax, ...) are private contiguous ``(B*NH, N)`` buffers in step order, in the accumulation dtype
(float32, or float64 for float64 inputs).

Around the tile kernel, three O(N) kernels replace what would be dozens of small torch ops per call: the stabiliser
scan (forward), the per-row backward prologue and the gate-gradient epilogue.
"""
import triton
import triton.language as tl


@triton.jit
def head_offset(batch_head, num_heads, stride_b, stride_h):
    """Offset of head ``batch_head = b * NH + h`` in a tensor with these batch and head strides (int64)."""
    return (batch_head // num_heads).to(tl.int64) * stride_b + (batch_head % num_heads).to(tl.int64) * stride_h


@triton.jit
def _tokens(steps, seq_len, REVERSE: tl.constexpr):
    """Token of each scan step (int64 for the address maths): the step itself, or N-1-step when REVERSE."""
    if REVERSE:
        tokens = seq_len - 1 - steps
    else:
        tokens = steps
    return tokens.to(tl.int64)


@triton.jit
def _causal_decay(target_hi, target_lo, target_pos, source_hi, source_lo, source_pos):
    """exp(logD - m) of every (target, source) pair of a tile; 0 where the source lies in the target's future."""
    log_decay = (target_hi + source_hi) + (target_lo + source_lo)
    return tl.exp(tl.where(source_pos <= target_pos, log_decay, float('-inf')))


@triton.jit
def _in_sequence(steps, seq_len):
    """Which steps exist: query-major tiles end at the last step, so the first one may start before step 0."""
    return (steps >= 0) & (steps < seq_len)


@triton.jit
def _load_log(hi_ptr, lo_ptr, offs, seq_len):
    """A hi/lo log vector; steps outside the sequence get -inf, so their decays are 0 and never meet 0 * inf."""
    mask = _in_sequence(offs, seq_len)
    return tl.load(hi_ptr + offs, mask=mask, other=float('-inf')), tl.load(lo_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _token_tile(tokens, offs_d, stride_n, stride_d):
    """Offsets of the (tokens, head-dim) tile of one head."""
    return tokens[:, None] * stride_n + offs_d[None, :] * stride_d


@triton.jit
def _load_tile(ptr, steps, offs_d, seq_len, stride_n, stride_d, HEAD_DIM: tl.constexpr, REVERSE: tl.constexpr):
    """The (steps, head-dim) tile of one head; 0 past the end of the sequence and of the head dim."""
    return tl.load(ptr + _token_tile(_tokens(steps, seq_len, REVERSE), offs_d, stride_n, stride_d),
                   mask=_in_sequence(steps, seq_len)[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_tile(ptr, values, steps, offs_d, seq_len, stride_n, stride_d, HEAD_DIM: tl.constexpr,
                REVERSE: tl.constexpr):
    """Store the (steps, head-dim) tile of one head in the dtype of ``ptr``, within the sequence and the head dim."""
    tl.store(ptr + _token_tile(_tokens(steps, seq_len, REVERSE), offs_d, stride_n, stride_d),
             values.to(ptr.dtype.element_ty),
             mask=_in_sequence(steps, seq_len)[:, None] & (offs_d[None, :] < HEAD_DIM))


# Head-dim chunks. A tile of one head is held as its chunk of BLOCK head dims (at offs_d) and a tail chunk of the
# head dims past the last full chunk, in BLOCK_TAIL columns (fused._head_split). Without a tail (BLOCK_TAIL = 0) the
# second is the first again, which no caller uses: Triton has no optional tensors.
@triton.jit
def _tail_columns(HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """Head dims of the tail chunk."""
    return HEAD_DIM // BLOCK * BLOCK + tl.arange(0, BLOCK_TAIL)


@triton.jit
def _load_chunks(ptr, steps, offs_d, seq_len, stride_n, stride_d, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_TAIL: tl.constexpr, REVERSE: tl.constexpr):
    """The chunk and tail chunk of a (steps, head-dim) tile."""
    chunk = _load_tile(ptr, steps, offs_d, seq_len, stride_n, stride_d, HEAD_DIM, REVERSE)
    tail = chunk
    if BLOCK_TAIL > 0:
        tail = _load_tile(ptr, steps, _tail_columns(HEAD_DIM, BLOCK, BLOCK_TAIL), seq_len, stride_n, stride_d,
                          HEAD_DIM, REVERSE)
    return chunk, tail


@triton.jit
def _store_chunks(ptr, chunk, tail, steps, offs_d, seq_len, stride_n, stride_d, HEAD_DIM: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_TAIL: tl.constexpr, REVERSE: tl.constexpr):
    """Store a (steps, head-dim) tile given as its chunk and tail chunk."""
    _store_tile(ptr, chunk, steps, offs_d, seq_len, stride_n, stride_d, HEAD_DIM, REVERSE)
    if BLOCK_TAIL > 0:
        _store_tile(ptr, tail, steps, _tail_columns(HEAD_DIM, BLOCK, BLOCK_TAIL), seq_len, stride_n, stride_d,
                    HEAD_DIM, REVERSE)


@triton.jit
def _zero_chunks(ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TAIL: tl.constexpr, dtype: tl.constexpr):
    """Accumulators of a chunk and its tail chunk; without a tail, only the tail's updates are skipped, by callers."""
    chunk = tl.zeros((ROWS, BLOCK), dtype=dtype)
    tail = chunk
    if BLOCK_TAIL > 0:
        tail = tl.zeros((ROWS, BLOCK_TAIL), dtype=dtype)
    return chunk, tail


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """tl.dot with float32 (float64) accumulation; DOT_IN_FLOAT32 upcasts first (the interpreter multiplies bfloat16
    bits)."""
    if DOT_IN_FLOAT32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _chunk_dots(x, x_tail, y, y_tail, HAS_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                DOT_IN_FLOAT32: tl.constexpr):
    """x_a . y_b of all row pairs, the head dims held as one chunk and (HAS_TAIL) a tail chunk."""
    dots = _dot(x, tl.trans(y), DOT_PRECISION, DOT_IN_FLOAT32)
    if HAS_TAIL:
        dots += _dot(x_tail, tl.trans(y_tail), DOT_PRECISION, DOT_IN_FLOAT32)
    return dots


@triton.jit
def mlstm_tile_kernel(X, Y, Z, OUT, X2, OUT2, DOT_WITH, DOTS, SHIFT, ROW_LOG_HI, ROW_LOG_LO, COL_LOG_HI, COL_LOG_LO,
                      NORM_FLOOR, ROW_SUM, stride_xb, stride_xh, stride_xn, stride_xd, stride_yb, stride_yh, stride_yn,
                      stride_yd, stride_zb, stride_zh, stride_zn, stride_zd, stride_ob, stride_oh, stride_on, stride_od,
                      stride_x2b, stride_x2h, stride_x2n, stride_x2d, stride_o2b, stride_o2h, stride_o2n, stride_o2d,
                      stride_wb, stride_wh, stride_wn, stride_wd, seq_len, num_heads, eps, HEAD_DIM: tl.constexpr,
                      SCALE: tl.constexpr, REVERSE: tl.constexpr, KEY_MAJOR: tl.constexpr, FORWARD: tl.constexpr,
                      HAS_SHIFT: tl.constexpr, DUAL: tl.constexpr, HAS_DOTS: tl.constexpr,
                      BLOCK_OWN: tl.constexpr, BLOCK_LOOP: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DK_TAIL: tl.constexpr, BLOCK_DZ: tl.constexpr, BLOCK_DZ_TAIL: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """One tile of ``out`` (see the module docstring). FORWARD: divide by max(|row sum|, exp(-m)) + eps and store the
    row sums (needed by the backward) too. NORM_FLOOR and ROW_SUM are only read when FORWARD, SHIFT when HAS_SHIFT.
    DUAL: also ``out2`` = the product of ``x2`` with the roles of y and z swapped and no shift (dv beside dk: both
    walk the same pairs with the same decay); it needs the whole head in one chunk and tail of equal splits for
    BLOCK_DK and BLOCK_DZ, so that the y tiles serve as z tiles and back. HAS_DOTS: also each row's inner product of
    ``out`` (before rounding) with DOT_WITH, q.dq or k.dk for the gate gradients, into DOTS: one row of
    steps per output slice (grid axis 2).
    Rows a and b are scan steps; x, y, z and out are addressed at their tokens. SCALE = 1/sqrt(HEAD_DIM) is a
    compile-time constant so that it takes the dtype of the scores (a float argument is float32 on the GPU)."""
    # Head dims: one chunk and a tail chunk, or (large heads, no tail) chunks of BLOCK_DK walked in the x.y dot and
    # output slices of BLOCK_DZ on grid axis 2.
    X_RESIDENT: tl.constexpr = HEAD_DIM <= BLOCK_DK + BLOCK_DK_TAIL
    tl.static_assert(X_RESIDENT or BLOCK_DK_TAIL == 0)
    tl.static_assert(HEAD_DIM <= BLOCK_DZ + BLOCK_DZ_TAIL or BLOCK_DZ_TAIL == 0)
    tl.static_assert(not DUAL or (X_RESIDENT and BLOCK_DZ == BLOCK_DK and BLOCK_DZ_TAIL == BLOCK_DK_TAIL))
    batch_head = tl.program_id(1)
    X += head_offset(batch_head, num_heads, stride_xb, stride_xh)
    Y += head_offset(batch_head, num_heads, stride_yb, stride_yh)
    Z += head_offset(batch_head, num_heads, stride_zb, stride_zh)
    OUT += head_offset(batch_head, num_heads, stride_ob, stride_oh)
    steps = batch_head.to(tl.int64) * seq_len
    ACC = ROW_LOG_HI.dtype.element_ty
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dz = tl.program_id(2) * BLOCK_DZ + tl.arange(0, BLOCK_DZ)

    if KEY_MAJOR:  # own keys s, walk the queries t >= s
        own_start = tl.program_id(0) * BLOCK_OWN
        offs_a = own_start + tl.arange(0, BLOCK_OWN)
        own_hi, own_lo = _load_log(COL_LOG_HI + steps, COL_LOG_LO + steps, offs_a, seq_len)
        loop_start = (own_start // BLOCK_LOOP) * BLOCK_LOOP
        loop_end = seq_len
    else:  # own queries t, walk the keys s <= t; tiles end at the last step: the partial one walks the fewest keys
        own_start = seq_len - (tl.program_id(0) + 1) * BLOCK_OWN
        offs_a = own_start + tl.arange(0, BLOCK_OWN)
        own_hi, own_lo = _load_log(ROW_LOG_HI + steps, ROW_LOG_LO + steps, offs_a, seq_len)
        loop_start = 0
        loop_end = own_start + BLOCK_OWN
        if HAS_SHIFT:
            shift = tl.load(SHIFT + steps + offs_a, mask=_in_sequence(offs_a, seq_len), other=0.0)
    if X_RESIDENT:  # the own x tile is loaded once, like flash attention's Q
        x, x_tail = _load_chunks(X, offs_a, offs_dk, seq_len, stride_xn, stride_xd, HEAD_DIM, BLOCK_DK, BLOCK_DK_TAIL,
                                 REVERSE)
    if DUAL:
        X2 += head_offset(batch_head, num_heads, stride_x2b, stride_x2h)
        OUT2 += head_offset(batch_head, num_heads, stride_o2b, stride_o2h)
        x2, x2_tail = _load_chunks(X2, offs_a, offs_dk, seq_len, stride_x2n, stride_x2d, HEAD_DIM, BLOCK_DK,
                                   BLOCK_DK_TAIL, REVERSE)
        acc2, acc2_tail = _zero_chunks(BLOCK_OWN, BLOCK_DZ, BLOCK_DZ_TAIL, ACC)
    acc, acc_tail = _zero_chunks(BLOCK_OWN, BLOCK_DZ, BLOCK_DZ_TAIL, ACC)
    row_sum = tl.zeros((BLOCK_OWN,), dtype=ACC)
    for b_start in range(loop_start, loop_end, BLOCK_LOOP):
        offs_b = b_start + tl.arange(0, BLOCK_LOOP)
        if X_RESIDENT:
            y, y_tail = _load_chunks(Y, offs_b, offs_dk, seq_len, stride_yn, stride_yd, HEAD_DIM, BLOCK_DK,
                                     BLOCK_DK_TAIL, REVERSE)
            dots = _chunk_dots(x, x_tail, y, y_tail, BLOCK_DK_TAIL > 0, DOT_PRECISION, DOT_IN_FLOAT32)
        else:
            dots = tl.zeros((BLOCK_OWN, BLOCK_LOOP), dtype=ACC)
            for d_start in tl.static_range(0, HEAD_DIM, BLOCK_DK):
                x = _load_tile(X, offs_a, d_start + offs_dk, seq_len, stride_xn, stride_xd, HEAD_DIM, REVERSE)
                y = _load_tile(Y, offs_b, d_start + offs_dk, seq_len, stride_yn, stride_yd, HEAD_DIM, REVERSE)
                dots += _dot(x, tl.trans(y), DOT_PRECISION, DOT_IN_FLOAT32)
        if KEY_MAJOR:
            loop_hi, loop_lo = _load_log(ROW_LOG_HI + steps, ROW_LOG_LO + steps, offs_b, seq_len)
            decay = _causal_decay(loop_hi[None, :], loop_lo[None, :], offs_b[None, :],
                                  own_hi[:, None], own_lo[:, None], offs_a[:, None])
            if HAS_SHIFT:
                dots += tl.load(SHIFT + steps + offs_b, mask=offs_b < seq_len, other=0.0)[None, :]
        else:
            loop_hi, loop_lo = _load_log(COL_LOG_HI + steps, COL_LOG_LO + steps, offs_b, seq_len)
            decay = _causal_decay(own_hi[:, None], own_lo[:, None], offs_a[:, None],
                                  loop_hi[None, :], loop_lo[None, :], offs_b[None, :])
            if HAS_SHIFT:
                dots += shift[:, None]
        weights = dots * SCALE * decay
        if FORWARD:
            row_sum += tl.sum(weights, axis=1)
        z, z_tail = _load_chunks(Z, offs_b, offs_dz, seq_len, stride_zn, stride_zd, HEAD_DIM, BLOCK_DZ, BLOCK_DZ_TAIL,
                                 REVERSE)
        acc += _dot(weights.to(z.dtype), z, DOT_PRECISION, DOT_IN_FLOAT32)
        if BLOCK_DZ_TAIL > 0:
            acc_tail += _dot(weights.to(z.dtype), z_tail, DOT_PRECISION, DOT_IN_FLOAT32)
        if DUAL:
            dots2 = _chunk_dots(x2, x2_tail, z, z_tail, BLOCK_DK_TAIL > 0, DOT_PRECISION, DOT_IN_FLOAT32)
            weights2 = (dots2 * SCALE * decay).to(y.dtype)
            acc2 += _dot(weights2, y, DOT_PRECISION, DOT_IN_FLOAT32)
            if BLOCK_DZ_TAIL > 0:
                acc2_tail += _dot(weights2, y_tail, DOT_PRECISION, DOT_IN_FLOAT32)

    rows = _in_sequence(offs_a, seq_len)
    if FORWARD:
        divisor = tl.maximum(tl.abs(row_sum), tl.load(NORM_FLOOR + steps + offs_a, mask=rows, other=1.0)) + eps
        acc = acc / divisor[:, None]
        if BLOCK_DZ_TAIL > 0:
            acc_tail = acc_tail / divisor[:, None]
        tl.store(ROW_SUM + steps + offs_a, row_sum, mask=rows & (tl.program_id(2) == 0))
    _store_chunks(OUT, acc, acc_tail, offs_a, offs_dz, seq_len, stride_on, stride_od, HEAD_DIM, BLOCK_DZ,
                  BLOCK_DZ_TAIL, REVERSE)
    if DUAL:
        _store_chunks(OUT2, acc2, acc2_tail, offs_a, offs_dz, seq_len, stride_o2n, stride_o2d, HEAD_DIM, BLOCK_DZ,
                      BLOCK_DZ_TAIL, REVERSE)
    if HAS_DOTS:  # loaded again rather than kept from the loop (x2): fewer registers (ptxas: 215, not 248)
        DOT_WITH += head_offset(batch_head, num_heads, stride_wb, stride_wh)
        with_tile, with_tail = _load_chunks(DOT_WITH, offs_a, offs_dz, seq_len, stride_wn, stride_wd, HEAD_DIM,
                                            BLOCK_DZ, BLOCK_DZ_TAIL, REVERSE)
        dots = tl.sum(acc * with_tile.to(ACC), axis=1)
        if BLOCK_DZ_TAIL > 0:
            dots += tl.sum(acc_tail * with_tail.to(ACC), axis=1)
        output_slice = tl.program_id(2) * tl.num_programs(1)
        tl.store(DOTS + output_slice.to(tl.int64) * seq_len + steps + offs_a, dots, mask=rows)


@triton.jit
def _later_max(value_a, index_a, value_b, index_b):
    """Combine of a running (max, argmax) scan; ties go to the later step, like torch.cummax."""
    take_b = value_b >= value_a
    return tl.where(take_b, value_b, value_a), tl.where(take_b, index_b, index_a)


@triton.jit
def _store_split(hi_ptr, lo_ptr, x, offs, mask):
    """Store a float64 vector as the pair hi + lo of the buffers' dtype (float32, or float64 with lo = 0)."""
    hi = x.to(hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offs, hi, mask=mask)
    tl.store(lo_ptr + offs, (x - hi.to(tl.float64)).to(lo_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mlstm_stabiliser_kernel(IGATE, FGATE, ROW_LOG_HI, ROW_LOG_LO, COL_LOG_HI, COL_LOG_LO, NORM_FLOOR, ARGMAX,
                            stride_ib, stride_ih, stride_in, stride_fb, stride_fh, stride_fn, seq_len, num_heads,
                            REVERSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per head, in float64: F = cumsum(logsigmoid(fgate)) and m_t = F_t + max_{s<=t}(i_s - F_s), the row max of
    logD, with its argmax s*_t (a step). Stores F - m and i - F (hi/lo), exp(-m) and s*. One program walks one head
    in step order."""
    batch_head = tl.program_id(0)
    IGATE += head_offset(batch_head, num_heads, stride_ib, stride_ih)
    FGATE += head_offset(batch_head, num_heads, stride_fb, stride_fh)
    steps = batch_head.to(tl.int64) * seq_len
    cum_log_f = tl.zeros([1], dtype=tl.float64)
    running_max = tl.full([1], float('-inf'), dtype=tl.float64)
    running_argmax = tl.zeros([1], dtype=tl.int32)
    for start in range(0, seq_len, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mask = offs < seq_len
        tokens = _tokens(offs, seq_len, REVERSE)
        fgate = tl.load(FGATE + tokens * stride_fn, mask=mask, other=0.0).to(tl.float64)
        igate = tl.load(IGATE + tokens * stride_in, mask=mask, other=0.0).to(tl.float64)
        log_f = tl.where(mask, tl.minimum(fgate, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fgate))), 0.0)
        cum = cum_log_f + tl.cumsum(log_f, 0)
        col_log = igate - cum
        block_max, block_argmax = tl.associative_scan((tl.where(mask, col_log, float('-inf')), offs), 0, _later_max)
        step_max, step_argmax = _later_max(running_max, running_argmax, block_max, block_argmax)
        m = cum + step_max
        _store_split(ROW_LOG_HI + steps, ROW_LOG_LO + steps, cum - m, offs, mask)
        _store_split(COL_LOG_HI + steps, COL_LOG_LO + steps, col_log, offs, mask)
        tl.store(NORM_FLOOR + steps + offs, tl.exp(-m).to(NORM_FLOOR.dtype.element_ty), mask=mask)
        tl.store(ARGMAX + steps + offs, step_argmax, mask=mask)
        # Carry to the next block: the running max and its argmax are non-decreasing along the block.
        cum_log_f += tl.sum(log_f, 0, keep_dims=True)
        running_max = tl.max(tl.where(mask, step_max, float('-inf')), 0, keep_dims=True)
        running_argmax = tl.max(tl.where(mask, step_argmax, 0), 0, keep_dims=True)


@triton.jit
def _row_tiles(batch_head, tokens, offs_d, num_heads, stride_b, stride_h, stride_n, stride_d):
    """Offsets of the (row, head-dim) tile of rows from several heads."""
    return (head_offset(batch_head, num_heads, stride_b, stride_h) + tokens * stride_n)[:, None] \
        + offs_d[None, :] * stride_d


@triton.jit
def mlstm_grad_prep_kernel(GRAD_H, H, ROW_SUM, NORM_FLOOR, ARGMAX, SCALED_GRAD, ROW_SHIFT, GRAD_M, COLUMN_GRAD_M,
                           stride_gb, stride_gh, stride_gn, stride_gd, stride_hb, stride_hh, stride_hn, stride_hd,
                           stride_sb, stride_sh, stride_sn, stride_sd, n_rows, seq_len, num_heads, eps,
                           HEAD_DIM: tl.constexpr, REVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """Per row t of the backward (the steps of all heads flattened): with d_t the divisor and delta_t = g_t.h_t,
    stores g_t / d_t (input dtype), the row shift beta_t and the direct gradient of m_t, -delta_t eps / d_t, which also
    goes to column s*_t (m_t = logD[t, s*_t]). That scatter uses atomics, like torch's scatter_add on CUDA."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    batch_head = rows // seq_len
    tokens = _tokens(rows % seq_len, seq_len, REVERSE)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    ACC = ROW_SUM.dtype.element_ty
    grad_h = tl.load(GRAD_H + _row_tiles(batch_head, tokens, offs_d, num_heads, stride_gb, stride_gh, stride_gn,
                                         stride_gd), mask=tile_ok, other=0.0).to(ACC)
    h = tl.load(H + _row_tiles(batch_head, tokens, offs_d, num_heads, stride_hb, stride_hh, stride_hn, stride_hd),
                mask=tile_ok, other=0.0).to(ACC)
    delta = tl.sum(grad_h * h, axis=1)
    row_sum = tl.load(ROW_SUM + rows, mask=row_ok, other=0.0)
    norm_floor = tl.load(NORM_FLOOR + rows, mask=row_ok, other=1.0)
    divisor = tl.maximum(tl.abs(row_sum), norm_floor) + eps
    tl.store(SCALED_GRAD + _row_tiles(batch_head, tokens, offs_d, num_heads, stride_sb, stride_sh, stride_sn,
                                      stride_sd),
             (grad_h / divisor[:, None]).to(SCALED_GRAD.dtype.element_ty), mask=tile_ok)
    sign = tl.where(row_sum > 0, 1.0, tl.where(row_sum < 0, -1.0, 0.0))
    tl.store(ROW_SHIFT + rows, tl.where(tl.abs(row_sum) > norm_floor, -delta / divisor * sign, 0.0), mask=row_ok)
    grad_m = -delta * eps / divisor
    tl.store(GRAD_M + rows, grad_m, mask=row_ok)
    argmax = tl.load(ARGMAX + rows, mask=row_ok, other=0)
    tl.atomic_add(COLUMN_GRAD_M + (rows - rows % seq_len) + argmax, grad_m, mask=row_ok)


@triton.jit
def mlstm_gate_grad_kernel(GRAD_M, COLUMN_GRAD_M, ROW_DOTS, COLUMN_DOTS, FGATE, DIGATE, DFGATE, stride_fb, stride_fh,
                           stride_fn, stride_gb, stride_gh, stride_gn, seq_len, num_heads, SLICES: tl.constexpr,
                           REVERSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gate gradients of one head (module docstring of fused.py): the row and column sums of dL/dlogD are q_t.dq_t
    and k_s.dk_s (ROW_DOTS, COLUMN_DOTS: the tile kernel's per-step inner products, a row of all heads' steps per
    output slice), plus the gradient of m; di = column sum, dlog f = reverse cumsum over the steps of (row - column
    sum). Walks the head backwards carrying that cumsum. The gate gradients share the strides ``stride_g*``."""
    batch_head = tl.program_id(0)
    FGATE += head_offset(batch_head, num_heads, stride_fb, stride_fh)
    DIGATE += head_offset(batch_head, num_heads, stride_gb, stride_gh)
    DFGATE += head_offset(batch_head, num_heads, stride_gb, stride_gh)
    steps = batch_head.to(tl.int64) * seq_len
    slice_stride = tl.num_programs(0).to(tl.int64) * seq_len
    ACC = GRAD_M.dtype.element_ty
    grad_log_f_after = tl.zeros([1], dtype=ACC)
    num_blocks = tl.cdiv(seq_len, BLOCK_N)
    for block in range(0, num_blocks):
        offs = (num_blocks - 1 - block) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < seq_len
        tokens = _tokens(offs, seq_len, REVERSE)
        row_total = tl.load(GRAD_M + steps + offs, mask=mask, other=0.0)
        column_total = tl.load(COLUMN_GRAD_M + steps + offs, mask=mask, other=0.0)
        for output_slice in tl.static_range(SLICES):
            row_total += tl.load(ROW_DOTS + output_slice * slice_stride + steps + offs, mask=mask, other=0.0)
            column_total += tl.load(COLUMN_DOTS + output_slice * slice_stride + steps + offs, mask=mask, other=0.0)
        grad_cum_log_f = row_total - column_total
        grad_log_f = grad_log_f_after + tl.cumsum(grad_cum_log_f, 0, reverse=True)
        grad_log_f_after += tl.sum(grad_cum_log_f, 0, keep_dims=True)
        fgate = tl.load(FGATE + tokens * stride_fn, mask=mask, other=0.0).to(ACC)
        tl.store(DIGATE + tokens * stride_gn, column_total.to(DIGATE.dtype.element_ty), mask=mask)
        tl.store(DFGATE + tokens * stride_gn, (grad_log_f * tl.sigmoid(-fgate)).to(DFGATE.dtype.element_ty),
                 mask=mask)
