"""Triton kernels of :func:`~.reference.conv_qkv`: depthwise conv + SiLU + block-diagonal q/k/v in one pass.

A program owns a tile of tokens of one image and a range of channel groups (a group = the ``S = 4`` channels of one
block of the block-diagonal projections). It holds the group's four channels as four ``(tokens, groups)`` tiles, so
the 4x4 products are plain multiply-adds on registers: no reshapes, no shared memory. Tokens are row-major on the
``(height, width)`` grid; ``REVERSE`` reads the conv kernel rotated by 180 degrees.

Backward, two launches whose programs each walk ``TILES`` token tiles, one channel of the groups at a time, adding
the weight-gradient terms of every tile into register tiles and reducing them once at the end: one partial row per
program (summed by the caller: deterministic, no atomics) instead of one per token tile, and a reduction across
threads per program instead of per tile. (1) Recompute the conv, store the gradient at its pre-activation, and sum
the conv bias and q/k/v weight and bias gradients; (2) the gradient of the input, which gathers the pre-activation
gradient of neighbouring tokens (other programs' tiles, hence the second launch) plus the v path, and with the same
gathered taps the conv weight gradient (tap ``d`` of channel ``c``: sum over tokens ``s`` of ``x[s] dpre[s - d]``).
"""
import triton
import triton.language as tl

GROUP = tl.constexpr(4)  # channels per block of the block-diagonal projections


@triton.jit
def _tap(X, image, offs_t, chan, tap_y, tap_x, height, width, chans, KSIZE: tl.constexpr, ACC: tl.constexpr):
    """``x`` at the token offset by tap ``(tap_y, tap_x)`` of a KSIZE x KSIZE kernel (zero outside the image)."""
    row = offs_t // width + (tap_y - KSIZE // 2)
    col = offs_t % width + (tap_x - KSIZE // 2)
    inside = (offs_t < height * width) & (row >= 0) & (row < height) & (col >= 0) & (col < width)
    ptrs = X + image + (row * width + col)[:, None] * chans + chan[None, :]
    return tl.load(ptrs, mask=inside[:, None] & (chan[None, :] < chans), other=0.0).to(ACC)


@triton.jit
def _kernel_index(tap_y, tap_x, KSIZE: tl.constexpr, REVERSE: tl.constexpr):
    if REVERSE:
        return (KSIZE - 1 - tap_y) * KSIZE + (KSIZE - 1 - tap_x)
    return tap_y * KSIZE + tap_x


@triton.jit
def _conv(X, CONV_W, CONV_B, image, offs_t, chan, height, width, chans, KSIZE: tl.constexpr,
          REVERSE: tl.constexpr, ACC: tl.constexpr):
    """Pre-activation of the depthwise conv for one channel of each group, and the input at the centre tap."""
    chan_ok = chan < chans
    pre = tl.zeros((offs_t.shape[0], chan.shape[0]), dtype=ACC)
    for tap_y in tl.static_range(KSIZE):
        for tap_x in tl.static_range(KSIZE):
            weight = tl.load(CONV_W + chan * (KSIZE * KSIZE) + _kernel_index(tap_y, tap_x, KSIZE, REVERSE),
                             mask=chan_ok, other=0.0).to(ACC)
            pre += weight[None, :] * _tap(X, image, offs_t, chan, tap_y, tap_x, height, width, chans, KSIZE, ACC)
    centre = _tap(X, image, offs_t, chan, KSIZE // 2, KSIZE // 2, height, width, chans, KSIZE, ACC)
    return pre + tl.load(CONV_B + chan, mask=chan_ok, other=0.0).to(ACC)[None, :], centre


@triton.jit
def _project(QKV_W, QKV_B, which, groups, group_ok, chans, o: tl.constexpr, a0, a1, a2, a3, ACC: tl.constexpr):
    """Output ``o`` of each group's 4x4 block of projection ``which`` (0 q, 1 k, 2 v) applied to ``a0..a3``."""
    base = QKV_W + which * chans * GROUP + groups * (GROUP * GROUP) + o * GROUP
    out = (tl.load(base, mask=group_ok, other=0.0).to(ACC)[None, :] * a0
           + tl.load(base + 1, mask=group_ok, other=0.0).to(ACC)[None, :] * a1
           + tl.load(base + 2, mask=group_ok, other=0.0).to(ACC)[None, :] * a2
           + tl.load(base + 3, mask=group_ok, other=0.0).to(ACC)[None, :] * a3)
    return out + tl.load(QKV_B + which * chans + groups * GROUP + o, mask=group_ok, other=0.0).to(ACC)[None, :]


@triton.jit
def _program_tile(height, width, chans, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """This program's tokens and channel groups, the offset of its image and the mask of its tile."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_ok = groups < chans // GROUP
    n_tokens = height * width
    ok = (offs_t[:, None] < n_tokens) & group_ok[None, :]
    return offs_t, groups, group_ok, tl.program_id(2).to(tl.int64) * n_tokens * chans, ok


@triton.jit
def _tile_ptrs(PTR, image, offs_t, chan, row_len, column):
    return PTR + image + offs_t[:, None] * row_len + column + chan[None, :]


@triton.jit
def conv_qkv_forward_kernel(X, CONV_W, CONV_B, QKV_W, QKV_B, X_CONV, QKV, height, width, chans,
                            KSIZE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Grid: (token tiles, group tiles, batch). Writes silu(conv(x)) and q | k | v."""
    offs_t, groups, group_ok, image, ok = _program_tile(height, width, chans, BLOCK_T, BLOCK_G)
    out_image = image * 3
    pre0, x0 = _conv(X, CONV_W, CONV_B, image, offs_t, groups * GROUP, height, width, chans, KSIZE, REVERSE, ACC)
    pre1, x1 = _conv(X, CONV_W, CONV_B, image, offs_t, groups * GROUP + 1, height, width, chans, KSIZE, REVERSE, ACC)
    pre2, x2 = _conv(X, CONV_W, CONV_B, image, offs_t, groups * GROUP + 2, height, width, chans, KSIZE, REVERSE, ACC)
    pre3, x3 = _conv(X, CONV_W, CONV_B, image, offs_t, groups * GROUP + 3, height, width, chans, KSIZE, REVERSE, ACC)
    a0, a1, a2, a3 = pre0 * tl.sigmoid(pre0), pre1 * tl.sigmoid(pre1), pre2 * tl.sigmoid(pre2), pre3 * tl.sigmoid(pre3)
    dtype = X_CONV.dtype.element_ty
    tl.store(_tile_ptrs(X_CONV, image, offs_t, groups * GROUP, chans, 0), a0.to(dtype), mask=ok)
    tl.store(_tile_ptrs(X_CONV, image, offs_t, groups * GROUP, chans, 1), a1.to(dtype), mask=ok)
    tl.store(_tile_ptrs(X_CONV, image, offs_t, groups * GROUP, chans, 2), a2.to(dtype), mask=ok)
    tl.store(_tile_ptrs(X_CONV, image, offs_t, groups * GROUP, chans, 3), a3.to(dtype), mask=ok)
    for which in tl.static_range(3):
        for o in tl.static_range(GROUP):
            if which == 2:  # v projects the conv's input
                out = _project(QKV_W, QKV_B, which, groups, group_ok, chans, o, x0, x1, x2, x3, ACC)
            else:
                out = _project(QKV_W, QKV_B, which, groups, group_ok, chans, o, a0, a1, a2, a3, ACC)
            tl.store(_tile_ptrs(QKV, out_image, offs_t, groups * GROUP, 3 * chans, which * chans + o),
                     out.to(QKV.dtype.element_ty), mask=ok)


@triton.jit
def _load_grad(GRAD, image, offs_t, groups, row_len, column, ok, ACC: tl.constexpr):
    return tl.load(_tile_ptrs(GRAD, image, offs_t, groups * GROUP, row_len, column), mask=ok, other=0.0).to(ACC)


@triton.jit
def _load_group(GRAD, image, offs_t, groups, row_len, column, ok, ACC: tl.constexpr):
    """The four channels of each group, starting at ``column`` of rows of ``row_len``."""
    return (_load_grad(GRAD, image, offs_t, groups, row_len, column, ok, ACC),
            _load_grad(GRAD, image, offs_t, groups, row_len, column + 1, ok, ACC),
            _load_grad(GRAD, image, offs_t, groups, row_len, column + 2, ok, ACC),
            _load_grad(GRAD, image, offs_t, groups, row_len, column + 3, ok, ACC))


@triton.jit
def _block_column(QKV_W, which, groups, group_ok, chans, i: tl.constexpr, ACC: tl.constexpr):
    """Column ``i`` of each group's 4x4 block of projection ``which``: ``W[o, i]`` for ``o = 0..3``."""
    base = QKV_W + which * chans * GROUP + groups * (GROUP * GROUP) + i
    return (tl.load(base, mask=group_ok, other=0.0).to(ACC)[None, :],
            tl.load(base + GROUP, mask=group_ok, other=0.0).to(ACC)[None, :],
            tl.load(base + 2 * GROUP, mask=group_ok, other=0.0).to(ACC)[None, :],
            tl.load(base + 3 * GROUP, mask=group_ok, other=0.0).to(ACC)[None, :])


@triton.jit
def _channel(i: tl.constexpr, d0, d1, d2, d3):
    """``d_i`` of four per-channel tiles (``i`` known at compile time)."""
    if i == 0:
        return d0
    elif i == 1:
        return d1
    elif i == 2:
        return d2
    return d3


@triton.jit
def _add_outer(acc0, acc1, acc2, acc3, d0, d1, d2, d3, a):
    """Accumulate the weight-gradient terms ``d_o * a`` of one input channel for ``o = 0..3``."""
    return acc0 + d0 * a, acc1 + d1 * a, acc2 + d2 * a, acc3 + d3 * a


@triton.jit
def _store_column_sums(PTR, group_ok, acc0, acc1, acc2, acc3):
    """dW[g, o, i] (``PTR`` at ``o = 0``): the program's sum of each accumulated tile."""
    tl.store(PTR, tl.sum(acc0, axis=0), mask=group_ok)
    tl.store(PTR + GROUP, tl.sum(acc1, axis=0), mask=group_ok)
    tl.store(PTR + 2 * GROUP, tl.sum(acc2, axis=0), mask=group_ok)
    tl.store(PTR + 3 * GROUP, tl.sum(acc3, axis=0), mask=group_ok)


@triton.jit
def _walk_setup(height, width, chans, KSIZE: tl.constexpr, BLOCK_G: tl.constexpr):
    """Channel groups, image offset and partial row of a backward program (grid: token ranges, groups, batch)."""
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_ok = groups < chans // GROUP
    image = tl.program_id(2).to(tl.int64) * height * width * chans
    row_len = chans * (KSIZE * KSIZE + 1) + 3 * chans * GROUP + 3 * chans
    part_row = (tl.program_id(2).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * row_len
    return groups, group_ok, image, part_row


@triton.jit
def _walk_range(n_tokens, BLOCK_T: tl.constexpr, TILES: tl.constexpr):
    """The token tiles this program walks: ``TILES`` of them, fewer at the end of the image."""
    first = tl.program_id(0) * TILES
    return first, tl.minimum(first + TILES, tl.cdiv(n_tokens, BLOCK_T))


@triton.jit
def _walk_tile(tile, n_tokens, group_ok, BLOCK_T: tl.constexpr):
    """Tokens of token tile ``tile`` and the mask of the tile."""
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    return offs_t, (offs_t[:, None] < n_tokens) & group_ok[None, :]


@triton.jit
def conv_qkv_backward_kernel(X, CONV_W, CONV_B, QKV_W, GRAD_X_CONV, GRAD_QKV, GRAD_PRE, PARTIAL, height, width,
                             chans, KSIZE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, TILES: tl.constexpr):
    """Launch 1 of the backward (module docstring): grad_pre, and the partial sums of the conv bias and q/k/v weight
    and bias gradients. PARTIAL: one row per program, ``[conv weight | conv bias | qkv weight | qkv bias]``."""
    groups, group_ok, image, part_row = _walk_setup(height, width, chans, KSIZE, BLOCK_G)
    grad_image = image * 3
    n_tokens = height * width
    first_tile, end_tile = _walk_range(n_tokens, BLOCK_T, TILES)
    zero = tl.zeros((BLOCK_T, BLOCK_G), dtype=ACC)
    for i in tl.static_range(GROUP):
        chan = groups * GROUP + i
        wq0, wq1, wq2, wq3 = _block_column(QKV_W, 0, groups, group_ok, chans, i, ACC)
        wk0, wk1, wk2, wk3 = _block_column(QKV_W, 1, groups, group_ok, chans, i, ACC)
        bias_conv, bias_q, bias_k, bias_v = zero, zero, zero, zero
        wgq0, wgq1, wgq2, wgq3 = zero, zero, zero, zero
        wgk0, wgk1, wgk2, wgk3 = zero, zero, zero, zero
        wgv0, wgv1, wgv2, wgv3 = zero, zero, zero, zero
        for tile in range(first_tile, end_tile):
            offs_t, ok = _walk_tile(tile, n_tokens, group_ok, BLOCK_T)
            dq0, dq1, dq2, dq3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, 0, ok, ACC)
            dk0, dk1, dk2, dk3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, chans, ok, ACC)
            dv0, dv1, dv2, dv3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, 2 * chans, ok, ACC)
            pre, x = _conv(X, CONV_W, CONV_B, image, offs_t, chan, height, width, chans, KSIZE, REVERSE, ACC)
            sig = tl.sigmoid(pre)
            grad_act = (_load_grad(GRAD_X_CONV, image, offs_t, groups, chans, i, ok, ACC)
                        + wq0 * dq0 + wq1 * dq1 + wq2 * dq2 + wq3 * dq3
                        + wk0 * dk0 + wk1 * dk1 + wk2 * dk2 + wk3 * dk3)
            grad_pre = tl.where(ok, grad_act * sig * (1 + pre * (1 - sig)), 0.0)
            tl.store(_tile_ptrs(GRAD_PRE, image, offs_t, groups * GROUP, chans, i), grad_pre, mask=ok)
            act = pre * sig
            bias_conv += grad_pre
            bias_q += _channel(i, dq0, dq1, dq2, dq3)
            bias_k += _channel(i, dk0, dk1, dk2, dk3)
            bias_v += _channel(i, dv0, dv1, dv2, dv3)
            wgq0, wgq1, wgq2, wgq3 = _add_outer(wgq0, wgq1, wgq2, wgq3, dq0, dq1, dq2, dq3, act)
            wgk0, wgk1, wgk2, wgk3 = _add_outer(wgk0, wgk1, wgk2, wgk3, dk0, dk1, dk2, dk3, act)
            wgv0, wgv1, wgv2, wgv3 = _add_outer(wgv0, wgv1, wgv2, wgv3, dv0, dv1, dv2, dv3, x)  # v projects x
        row = PARTIAL + part_row + chans * KSIZE * KSIZE
        tl.store(row + chan, tl.sum(bias_conv, axis=0), mask=group_ok)
        weights = row + chans + groups * (GROUP * GROUP) + i
        _store_column_sums(weights, group_ok, wgq0, wgq1, wgq2, wgq3)
        _store_column_sums(weights + chans * GROUP, group_ok, wgk0, wgk1, wgk2, wgk3)
        _store_column_sums(weights + 2 * chans * GROUP, group_ok, wgv0, wgv1, wgv2, wgv3)
        biases = row + chans + 3 * chans * GROUP + chan
        tl.store(biases, tl.sum(bias_q, axis=0), mask=group_ok)
        tl.store(biases + chans, tl.sum(bias_k, axis=0), mask=group_ok)
        tl.store(biases + 2 * chans, tl.sum(bias_v, axis=0), mask=group_ok)


@triton.jit
def conv_qkv_input_grad_kernel(GRAD_PRE, X, CONV_W, QKV_W, GRAD_QKV, GRAD_X, PARTIAL, height, width, chans,
                               KSIZE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_G: tl.constexpr, TILES: tl.constexpr, BLOCK_TAPS: tl.constexpr):
    """Launch 2 of the backward: dx = transposed depthwise conv of the pre-activation gradient + v's block^T dv, and
    the partial sums of the conv weight gradient (the first columns of launch 1's PARTIAL rows).

    All taps at once, as a ``(tokens, groups, taps)`` tile: forward ``pre[t] = sum_d w[d] x[t + d]`` gives
    ``dx[s] = sum_d w[d] dpre[s - d]`` and ``dw[d] = sum_s x[s] dpre[s - d]`` from the same gathered values.
    """
    groups, group_ok, image, part_row = _walk_setup(height, width, chans, KSIZE, BLOCK_G)
    grad_image = image * 3
    n_tokens = height * width
    first_tile, end_tile = _walk_range(n_tokens, BLOCK_T, TILES)
    taps = tl.arange(0, BLOCK_TAPS)
    tap_ok = taps < KSIZE * KSIZE
    shift_y, shift_x = taps // KSIZE - KSIZE // 2, taps % KSIZE - KSIZE // 2  # the offset d of each tap
    weight_index = _kernel_index(taps // KSIZE, taps % KSIZE, KSIZE, REVERSE)
    for i in tl.static_range(GROUP):
        chan = groups * GROUP + i
        wv0, wv1, wv2, wv3 = _block_column(QKV_W, 2, groups, group_ok, chans, i, ACC)
        weight_ptrs = chan[:, None] * (KSIZE * KSIZE) + weight_index[None, :]
        conv_w = tl.load(CONV_W + weight_ptrs, mask=group_ok[:, None] & tap_ok[None, :], other=0.0).to(ACC)
        grad_w = tl.zeros((BLOCK_T, BLOCK_G, BLOCK_TAPS), dtype=ACC)
        for tile in range(first_tile, end_tile):
            offs_t, ok = _walk_tile(tile, n_tokens, group_ok, BLOCK_T)
            dv0, dv1, dv2, dv3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, 2 * chans, ok, ACC)
            row = offs_t[:, None, None] // width - shift_y[None, None, :]
            col = offs_t[:, None, None] % width - shift_x[None, None, :]
            inside = (ok[:, :, None] & tap_ok[None, None, :] & (row >= 0) & (row < height) & (col >= 0)
                      & (col < width))
            grad_pre = tl.load(GRAD_PRE + image + (row * width + col) * chans + chan[None, :, None], mask=inside,
                               other=0.0).to(ACC)
            x = _load_grad(X, image, offs_t, groups, chans, i, ok, ACC)
            grad_w += grad_pre * x[:, :, None]
            grad = wv0 * dv0 + wv1 * dv1 + wv2 * dv2 + wv3 * dv3 + tl.sum(grad_pre * conv_w[None, :, :], axis=2)
            tl.store(_tile_ptrs(GRAD_X, image, offs_t, groups * GROUP, chans, i), grad.to(GRAD_X.dtype.element_ty),
                     mask=ok)
        tl.store(PARTIAL + part_row + weight_ptrs, tl.sum(grad_w, axis=0), mask=group_ok[:, None] & tap_ok[None, :])
