"""Triton kernels of :func:`~.reference.conv_qkv`: depthwise conv + SiLU + block-diagonal q/k/v in one pass.

A program owns a tile of tokens of one image and a range of channel groups (a group = the ``S = 4`` channels of one
block of the block-diagonal projections). It holds the group's four channels as four ``(tokens, groups)`` tiles, so
the 4x4 products are plain multiply-adds on registers: no reshapes, no shared memory. Tokens are row-major on the
``(height, width)`` grid; ``REVERSE`` reads the conv kernel rotated by 180 degrees.

Backward, two launches: (1) recompute the conv, form the gradient at the conv's pre-activation and every weight
gradient of the tile (partial sums, one row per program, summed by the caller: deterministic, no atomics); (2) the
gradient of the input, which gathers the pre-activation gradient of neighbouring tokens (other programs' tiles,
hence the second launch) plus the v path.
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
def _project_transposed(QKV_W, which, groups, group_ok, chans, i: tl.constexpr, d0, d1, d2, d3, ACC: tl.constexpr):
    """Input ``i`` of each group's block of projection ``which``, transposed: sum_o W[o, i] * d_o."""
    base = QKV_W + which * chans * GROUP + groups * (GROUP * GROUP) + i
    return (tl.load(base, mask=group_ok, other=0.0).to(ACC)[None, :] * d0
            + tl.load(base + GROUP, mask=group_ok, other=0.0).to(ACC)[None, :] * d1
            + tl.load(base + 2 * GROUP, mask=group_ok, other=0.0).to(ACC)[None, :] * d2
            + tl.load(base + 3 * GROUP, mask=group_ok, other=0.0).to(ACC)[None, :] * d3)


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
def _channel_backward(X, CONV_W, CONV_B, QKV_W, GRAD_X_CONV, GRAD_PRE, PARTIAL, part_row, image, offs_t, groups,
                      group_ok, ok, height, width, chans, i: tl.constexpr, dq0, dq1, dq2, dq3, dk0, dk1, dk2, dk3,
                      KSIZE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
    """Channel ``i`` of each group: store the pre-activation gradient and the conv weight/bias partial sums;
    return the activation (for the q/k weight gradients)."""
    chan = groups * GROUP + i
    pre, _ = _conv(X, CONV_W, CONV_B, image, offs_t, chan, height, width, chans, KSIZE, REVERSE, ACC)
    sig = tl.sigmoid(pre)
    grad_act = (_load_grad(GRAD_X_CONV, image, offs_t, groups, chans, i, ok, ACC)
                + _project_transposed(QKV_W, 0, groups, group_ok, chans, i, dq0, dq1, dq2, dq3, ACC)
                + _project_transposed(QKV_W, 1, groups, group_ok, chans, i, dk0, dk1, dk2, dk3, ACC))
    grad_pre = tl.where(ok, grad_act * sig * (1 + pre * (1 - sig)), 0.0)
    tl.store(_tile_ptrs(GRAD_PRE, image, offs_t, groups * GROUP, chans, i), grad_pre, mask=ok)
    # Partial row: [conv weight (chans, K*K) | conv bias (chans) | qkv weight (3, chans * 4) | qkv bias (3, chans)]
    for tap_y in tl.static_range(KSIZE):
        for tap_x in tl.static_range(KSIZE):
            x = _tap(X, image, offs_t, chan, tap_y, tap_x, height, width, chans, KSIZE, ACC)
            tl.store(PARTIAL + part_row + chan * (KSIZE * KSIZE) + _kernel_index(tap_y, tap_x, KSIZE, REVERSE),
                     tl.sum(grad_pre * x, axis=0), mask=group_ok)
    tl.store(PARTIAL + part_row + chans * KSIZE * KSIZE + chan, tl.sum(grad_pre, axis=0), mask=group_ok)
    return pre * sig


@triton.jit
def _store_weight_partials(PARTIAL, part_row, which, groups, group_ok, chans, i: tl.constexpr, a, d0, d1, d2, d3,
                           KSIZE: tl.constexpr):
    """dW[which, g, o, i] = sum over the tile of d_o * a (a = input channel i of the block)."""
    base = PARTIAL + part_row + chans * (KSIZE * KSIZE + 1) + which * chans * GROUP + groups * (GROUP * GROUP) + i
    tl.store(base, tl.sum(d0 * a, axis=0), mask=group_ok)
    tl.store(base + GROUP, tl.sum(d1 * a, axis=0), mask=group_ok)
    tl.store(base + 2 * GROUP, tl.sum(d2 * a, axis=0), mask=group_ok)
    tl.store(base + 3 * GROUP, tl.sum(d3 * a, axis=0), mask=group_ok)


@triton.jit
def _store_group_sums(PTR, group_ok, d0, d1, d2, d3):
    """Bias gradients: the tile's sum of each output channel of the group."""
    tl.store(PTR, tl.sum(d0, axis=0), mask=group_ok)
    tl.store(PTR + 1, tl.sum(d1, axis=0), mask=group_ok)
    tl.store(PTR + 2, tl.sum(d2, axis=0), mask=group_ok)
    tl.store(PTR + 3, tl.sum(d3, axis=0), mask=group_ok)


@triton.jit
def conv_qkv_backward_kernel(X, CONV_W, CONV_B, QKV_W, GRAD_X_CONV, GRAD_QKV, GRAD_PRE, PARTIAL, height, width,
                             chans, KSIZE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Launch 1 of the backward (module docstring). Grid as the forward; PARTIAL has one row per (batch, token tile)."""
    offs_t, groups, group_ok, image, ok = _program_tile(height, width, chans, BLOCK_T, BLOCK_G)
    grad_image = image * 3
    part_row = (tl.program_id(2).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * (
        chans * (KSIZE * KSIZE + 1) + 3 * chans * GROUP + 3 * chans)
    dq0, dq1, dq2, dq3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, 0, ok, ACC)
    dk0, dk1, dk2, dk3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, chans, ok, ACC)
    dv0, dv1, dv2, dv3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, 2 * chans, ok, ACC)
    for i in tl.static_range(GROUP):
        act = _channel_backward(X, CONV_W, CONV_B, QKV_W, GRAD_X_CONV, GRAD_PRE, PARTIAL, part_row, image, offs_t,
                                groups, group_ok, ok, height, width, chans, i, dq0, dq1, dq2, dq3, dk0, dk1, dk2,
                                dk3, KSIZE, REVERSE, ACC)
        x = _tap(X, image, offs_t, groups * GROUP + i, KSIZE // 2, KSIZE // 2, height, width, chans, KSIZE, ACC)
        _store_weight_partials(PARTIAL, part_row, 0, groups, group_ok, chans, i, act, dq0, dq1, dq2, dq3, KSIZE)
        _store_weight_partials(PARTIAL, part_row, 1, groups, group_ok, chans, i, act, dk0, dk1, dk2, dk3, KSIZE)
        _store_weight_partials(PARTIAL, part_row, 2, groups, group_ok, chans, i, x, dv0, dv1, dv2, dv3, KSIZE)
    bias_base = PARTIAL + part_row + chans * (KSIZE * KSIZE + 1) + 3 * chans * GROUP + groups * GROUP
    _store_group_sums(bias_base, group_ok, dq0, dq1, dq2, dq3)
    _store_group_sums(bias_base + chans, group_ok, dk0, dk1, dk2, dk3)
    _store_group_sums(bias_base + 2 * chans, group_ok, dv0, dv1, dv2, dv3)


@triton.jit
def conv_qkv_input_grad_kernel(GRAD_PRE, CONV_W, QKV_W, GRAD_QKV, GRAD_X, height, width, chans,
                               KSIZE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Launch 2 of the backward: dx = transposed depthwise conv of the pre-activation gradient + v's block^T dv."""
    offs_t, groups, group_ok, image, ok = _program_tile(height, width, chans, BLOCK_T, BLOCK_G)
    grad_image = image * 3
    dv0, dv1, dv2, dv3 = _load_group(GRAD_QKV, grad_image, offs_t, groups, 3 * chans, 2 * chans, ok, ACC)
    for i in tl.static_range(GROUP):
        chan = groups * GROUP + i
        grad = _project_transposed(QKV_W, 2, groups, group_ok, chans, i, dv0, dv1, dv2, dv3, ACC)
        # conv out[t] = sum_tap w[tap] x[t + tap - c]  =>  dx[s] = sum_tap w[tap] dpre[s - tap + c] (mirrored tap)
        for tap_y in tl.static_range(KSIZE):
            for tap_x in tl.static_range(KSIZE):
                weight = tl.load(CONV_W + chan * (KSIZE * KSIZE) + _kernel_index(tap_y, tap_x, KSIZE, REVERSE),
                                 mask=group_ok, other=0.0).to(ACC)
                grad += weight[None, :] * _tap(GRAD_PRE, image, offs_t, chan, KSIZE - 1 - tap_y, KSIZE - 1 - tap_x,
                                               height, width, chans, KSIZE, ACC)
        tl.store(_tile_ptrs(GRAD_X, image, offs_t, groups * GROUP, chans, i), grad.to(GRAD_X.dtype.element_ty),
                 mask=ok)
