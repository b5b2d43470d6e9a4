"""Triton kernels of :func:`~.reference.conv_qkv`: depthwise conv + SiLU + block-diagonal q/k/v in one pass.

A program owns a tile of tokens and a range of channel groups (a group = the ``S = 4`` channels of one block of the
block-diagonal projections); the forward's token tiles run over the batch's tokens flattened, image after image (no
partly empty tile at each image's end: 196 tokens at 224 px filled two tiles of 128), the backward's walk one image.
Every load and store is a ``(tokens, channels)`` tile with the channels contiguous, so global memory is read and
written in whole vectors (the earlier per-channel tiles, four channels apart, made every access a 2-byte scalar). For
a 4x4 product a tile is split in registers into the four ``(tokens, groups)``
tiles of its groups' channels (``tl.split``; each thread holds runs of adjacent channels, so no data moves between
threads), multiplied and added, and joined back. Tokens are row-major on the ``(height, width)`` grid; ``REVERSE``
reads the conv kernel rotated by 180 degrees. A conv tap is the tile's pointers plus one scalar, masked by its row and
column compared with scalars. ``LOOP_TAPS`` (a launch-config choice of the forward) runs the taps
as a loop that is not unrolled: unrolled, ptxas issues every tap's loads up front and holds them (and the 9 weights of
each of a thread's channels) in registers, e.g. 252 registers for the forward's tile of 128 tokens and 32 channels
with 4 warps (sm_90, bfloat16; 8 warps per SM), 153 as a loop (12 warps per SM), 96 with 64 tokens; the same products
are summed in the same order either way.

The forward also writes each channel tile's share of the gate pre-activations (``gate_weight @ q | k | v``, a sum
over all channels: the caller adds the shares), so that q | k | v are not read again for them. It projects, stores
and multiplies by the gate weights one of q, k, v at a time (few live tiles); the gate products are one ``tl.dot``
per projection (tensor cores) of the stored q | k | v and the gate weights rounded to the activations' dtype, as the
official model computes them under autocast.

Backward, three launches whose programs each walk ``TILES`` token tiles, adding the weight-gradient terms of every
tile into register tiles and reducing them once at the end: one partial row per program (summed by the caller:
deterministic, no atomics), and a reduction across threads per program instead of per tile. The gradients of q, k
and v are read as the mLSTM's plus the gates' share (``grad_gates @ gate_weight``, added on the fly). (1) From the
conv's pre-activation (stored by the backward's recomputation of the forward, ``STORE_PRE``: an elementwise read
instead of a second conv), store the gradient at the pre-activation, and sum the conv bias and the q and k weight and
bias gradients;
(2) the gradient of the input, which gathers the pre-activation gradient of neighbouring tokens (other programs'
tiles, hence the second launch) plus the v path, the v weight and bias gradients (v's gradient is at hand there, so
launch 1 neither reads it nor keeps its four weight-gradient tiles), and in the same walk the conv weight gradient
(tap ``d`` of channel ``c``: sum over tokens ``s`` of ``x[s] dpre[s - d]``, the shifted value that the input gradient
reads anyway), so each tile's x and each tap's shifted dpre are loaded once; one register tile per tap holds its sums;
(3) the gate weight and bias gradients (``grad_gates^T @ q | k | v`` and the sums of ``grad_gates``), so that the
partial rows hold every parameter's gradient in the order of the caller's flat buffer and one sum finishes them all
(a kernel of its own: launches 1 and 2 use all their registers).
"""
import triton
import triton.language as tl

GROUP = tl.constexpr(4)  # channels per block of the block-diagonal projections


@triton.jit
def _grid_position(offs_t, width):
    """Row and column of tokens on the ``(height, width)`` grid: once per tile, shared by all its taps."""
    return offs_t // width, offs_t % width


@triton.jit
def _kernel_index(tap_y, tap_x, KSIZE: tl.constexpr, REVERSE: tl.constexpr):
    if REVERSE:
        return (KSIZE - 1 - tap_y) * KSIZE + (KSIZE - 1 - tap_x)
    return tap_y * KSIZE + tap_x


@triton.jit
def _conv_weight(CONV_W, chan, chans, tap_y, tap_x, KSIZE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
    """The conv weights of tap ``(tap_y, tap_x)`` on this tile's channels, ``(1, channels)``."""
    return tl.load(CONV_W + chan[None, :] * (KSIZE * KSIZE) + _kernel_index(tap_y, tap_x, KSIZE, REVERSE),
                   mask=chan[None, :] < chans, other=0.0).to(ACC)


@triton.jit
def _shifted(ptrs, row, col, valid, chan_ok, dy, dx, height, width, row_len, ACC: tl.constexpr):
    """The tile at ``ptrs`` (tokens at ``(row, col)``, rows of ``row_len`` elements) shifted by ``(dy, dx)`` on the
    grid: zero outside the image and for tokens not ``valid``. One scalar added to the tile's pointers, and row and
    column compared with scalars."""
    inside = valid & (row >= -dy) & (row < height - dy) & (col >= -dx) & (col < width - dx)
    return tl.load(ptrs + (dy * width + dx) * row_len, mask=inside[:, None] & chan_ok[None, :], other=0.0).to(ACC)


@triton.jit
def _conv_tap(ptrs, CONV_W, tap, row, col, valid, chan, chans, height, width, row_len, KSIZE: tl.constexpr,
              REVERSE: tl.constexpr, ACC: tl.constexpr):
    """Tap ``tap`` (``tap_y * KSIZE + tap_x``) of the depthwise conv: its weights times the shifted tile."""
    tap_y, tap_x = tap // KSIZE, tap % KSIZE
    return (_conv_weight(CONV_W, chan, chans, tap_y, tap_x, KSIZE, REVERSE, ACC)
            * _shifted(ptrs, row, col, valid, chan < chans, tap_y - KSIZE // 2, tap_x - KSIZE // 2, height, width,
                       row_len, ACC))


@triton.jit
def _conv(ptrs, CONV_W, CONV_B, row, col, valid, chan, height, width, chans, row_len, KSIZE: tl.constexpr,
          REVERSE: tl.constexpr, ACC: tl.constexpr, LOOP_TAPS: tl.constexpr):
    """Pre-activation of the depthwise conv on a ``(tokens, channels)`` tile of x at ``ptrs`` (tokens at ``(row,
    col)`` of the grid; ``valid``: tokens that exist). ``LOOP_TAPS``: the taps as a loop that is not unrolled, so
    that one tap's weights and x tile are live at a time (fewer registers, more programs per SM) instead of all
    taps' loads issued up front; the same products summed in the same order either way."""
    pre = tl.zeros((ptrs.shape[0], chan.shape[0]), dtype=ACC)
    if LOOP_TAPS:
        for tap in tl.range(0, KSIZE * KSIZE, loop_unroll_factor=1):
            pre += _conv_tap(ptrs, CONV_W, tap, row, col, valid, chan, chans, height, width, row_len, KSIZE, REVERSE,
                             ACC)
    else:
        for tap in tl.static_range(KSIZE * KSIZE):
            pre += _conv_tap(ptrs, CONV_W, tap, row, col, valid, chan, chans, height, width, row_len, KSIZE, REVERSE,
                             ACC)
    return pre + tl.load(CONV_B + chan, mask=chan < chans, other=0.0).to(ACC)[None, :]


@triton.jit
def silu(pre):
    """The conv's SiLU of its (rounded) pre-activation, in one expression for every kernel that computes it (the
    forward, and the backward kernels that recompute it from the stored pre-activation), so all get the same value."""
    return pre * tl.sigmoid(pre)


@triton.jit
def _flat_tile(total, n_tokens, width, BLOCK_T: tl.constexpr):
    """This program's token tile over the batch's tokens flattened (image after image; tiles do not stop at an
    image's end, so no tile is partly empty but the last): the offset of its first token (int64, to be multiplied
    by a row length), its tokens relative to that, their image, their grid row and column, and which exist."""
    first = tl.program_id(0) * BLOCK_T
    local = tl.arange(0, BLOCK_T)
    token = first + local
    image = token // n_tokens
    in_image = token - image * n_tokens
    row = in_image // width
    return first.to(tl.int64), local, image, in_image, row, in_image - row * width, token < total


@triton.jit
def _tile_channels(BLOCK_G: tl.constexpr):
    """The channels of this program's groups, contiguous."""
    return tl.program_id(1) * (BLOCK_G * GROUP) + tl.arange(0, BLOCK_G * GROUP)


@triton.jit
def _tile_ptrs(PTR, image, offs_t, chan, row_len, column):
    return PTR + image + offs_t[:, None] * row_len + column + chan[None, :]


@triton.jit
def _load_tile(PTR, image, offs_t, chan, row_len, column, ok, ACC: tl.constexpr):
    return tl.load(_tile_ptrs(PTR, image, offs_t, chan, row_len, column), mask=ok, other=0.0).to(ACC)


@triton.jit
def _split_group(tile, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """A channel-contiguous ``(tokens, 4 * groups)`` tile as the four ``(tokens, groups)`` tiles of its channels."""
    even, odd = tl.split(tl.reshape(tile, (BLOCK_T, BLOCK_G, 2, 2)))  # channels 0, 2 and 1, 3 of each group
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    return a0, a1, a2, a3


@triton.jit
def _join_group(a0, a1, a2, a3, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Inverse of :func:`_split_group`."""
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), (BLOCK_T, BLOCK_G * GROUP))


@triton.jit
def _block_output(w, o: tl.constexpr, group_ok, a0, a1, a2, a3, TRANSPOSE: tl.constexpr, ACC: tl.constexpr):
    """Output ``o`` of each group's 4x4 block (``w`` at the block's first entry), or of its transpose, applied to
    the inputs ``a0..a3``."""
    row = w + (o if TRANSPOSE else o * GROUP)
    step: tl.constexpr = GROUP if TRANSPOSE else 1
    return (tl.load(row, mask=group_ok, other=0.0).to(ACC)[None, :] * a0
            + tl.load(row + step, mask=group_ok, other=0.0).to(ACC)[None, :] * a1
            + tl.load(row + 2 * step, mask=group_ok, other=0.0).to(ACC)[None, :] * a2
            + tl.load(row + 3 * step, mask=group_ok, other=0.0).to(ACC)[None, :] * a3)


@triton.jit
def _block_diagonal_tile(src, W, groups, group_ok, TRANSPOSE: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    """The block-diagonal projection of weight ``W`` (``(groups, 4, 4)``), or its transpose, of a channel-contiguous
    ``(tokens, 4 * groups)`` tile, same layout out: split into the four channels of each group, 4x4 multiply-adds on
    registers, joined back."""
    a0, a1, a2, a3 = _split_group(src, BLOCK_T, BLOCK_G)
    w = W + groups * (GROUP * GROUP)
    return _join_group(_block_output(w, 0, group_ok, a0, a1, a2, a3, TRANSPOSE, ACC),
                       _block_output(w, 1, group_ok, a0, a1, a2, a3, TRANSPOSE, ACC),
                       _block_output(w, 2, group_ok, a0, a1, a2, a3, TRANSPOSE, ACC),
                       _block_output(w, 3, group_ok, a0, a1, a2, a3, TRANSPOSE, ACC), BLOCK_T, BLOCK_G)


@triton.jit
def _add_outer(acc0, acc1, acc2, acc3, grad, src, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Accumulate the weight-gradient terms of one token tile: ``acc_o[t, 4g + i] += grad[t, 4g + o] src[t, 4g + i]``
    (``grad`` at the block's outputs, ``src`` its inputs)."""
    d0, d1, d2, d3 = _split_group(grad, BLOCK_T, BLOCK_G)
    return (acc0 + _join_group(d0, d0, d0, d0, BLOCK_T, BLOCK_G) * src,
            acc1 + _join_group(d1, d1, d1, d1, BLOCK_T, BLOCK_G) * src,
            acc2 + _join_group(d2, d2, d2, d2, BLOCK_T, BLOCK_G) * src,
            acc3 + _join_group(d3, d3, d3, d3, BLOCK_T, BLOCK_G) * src)


@triton.jit
def _store_weight_sums(PTR, chan, chan_ok, acc0, acc1, acc2, acc3):
    """dW[g, o, i] of a ``(G, 4, 4)`` block weight at ``PTR``: the program's sums of the accumulated tiles."""
    entry = PTR + (chan // GROUP) * (GROUP * GROUP) + chan % GROUP
    tl.store(entry, tl.sum(acc0, axis=0), mask=chan_ok)
    tl.store(entry + GROUP, tl.sum(acc1, axis=0), mask=chan_ok)
    tl.store(entry + 2 * GROUP, tl.sum(acc2, axis=0), mask=chan_ok)
    tl.store(entry + 3 * GROUP, tl.sum(acc3, axis=0), mask=chan_ok)


@triton.constexpr_function
def _gate_block(NUM_GATES):
    """Gates of a ``(tokens, gates)`` tile: at least 16, what ``tl.dot`` needs."""
    return max(16, triton.next_power_of_2(NUM_GATES))


@triton.jit
def _gate_row(IGATE_W, FGATE_W, gate: tl.constexpr, which, chan, chans, INPUT_GATES: tl.constexpr, ACC: tl.constexpr):
    """Gate ``gate``'s weights on this tile's channels of projection ``which`` (0 q, 1 k, 2 v): ``(channels,)``. The
    gates are the ``INPUT_GATES`` rows of ``IGATE_W`` (``(INPUT_GATES, 3 E)``), then those of ``FGATE_W``."""
    if gate < INPUT_GATES:
        row = IGATE_W + (gate * 3 + which) * chans
    else:
        row = FGATE_W + ((gate - INPUT_GATES) * 3 + which) * chans
    return tl.load(row + chan, mask=chan < chans, other=0.0).to(ACC)


@triton.jit
def _gate_columns(IGATE_W, FGATE_W, which, chan, chans, NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr):
    """Every gate's weights on this tile's channels of projection ``which``: ``(channels, gate block)`` as stored."""
    gate = tl.arange(0, _gate_block(NUM_GATES))[None, :]
    chan_ok = chan[:, None] < chans
    inputs = tl.load(IGATE_W + (gate * 3 + which) * chans + chan[:, None], mask=chan_ok & (gate < INPUT_GATES),
                     other=0.0)
    forgets = tl.load(FGATE_W + ((gate - INPUT_GATES) * 3 + which) * chans + chan[:, None],
                      mask=chan_ok & (gate >= INPUT_GATES) & (gate < NUM_GATES), other=0.0)
    return inputs + forgets


@triton.jit
def _gate_biases(IGATE_B, FGATE_B, NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr, ACC: tl.constexpr):
    """The gate biases, ``IGATE_B``'s then ``FGATE_B``'s, as a ``(gate block,)`` row."""
    gate = tl.arange(0, _gate_block(NUM_GATES))
    return (tl.load(IGATE_B + gate, mask=gate < INPUT_GATES, other=0.0).to(ACC)
            + tl.load(FGATE_B + gate - INPUT_GATES, mask=(gate >= INPUT_GATES) & (gate < NUM_GATES),
                      other=0.0).to(ACC))


@triton.constexpr_function
def _gate_dots(ACC, BLOCK_T, BLOCK_G):
    """Whether the gate products run as ``tl.dot``: in float32 accumulation (16-bit and float32 data; float64 keeps
    the FMAs) for tiles of at least 16 tokens and 16 channels."""
    return (ACC == tl.float32) & (BLOCK_T >= 16) & (BLOCK_G * GROUP.value >= 16)


@triton.constexpr_function
def _dot_precision(DATA):
    """Products of 16-bit values (at most 11 significant bits) are exact in tf32; float32 values need 'ieee'."""
    return 'ieee' if DATA == tl.float32 else 'tf32'


@triton.jit
def _add_gate_products(gates, out, IGATE_W, FGATE_W, which, chan, chans, NUM_GATES: tl.constexpr,
                       INPUT_GATES: tl.constexpr, DATA: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_G: tl.constexpr):
    """``gates (tokens, gate block) + out @ gate_weight[:, which's channels]^T``: projection ``which``'s share of the
    gate pre-activations, of its output ``out`` as stored (rounded to ``DATA``) and the gate weights rounded to
    ``DATA``, summed in float32: the official model's numerics under autocast (a linear layer of the stored q | k | v),
    and exact products on tensor cores (``tl.dot``; FMAs where :func:`_gate_dots` is false)."""
    gate = tl.arange(0, _gate_block(NUM_GATES))
    if _gate_dots(ACC, BLOCK_T, BLOCK_G):
        weights = _gate_columns(IGATE_W, FGATE_W, which, chan, chans, NUM_GATES, INPUT_GATES)
        return tl.dot(out, weights.to(DATA).to(ACC), gates, input_precision=_dot_precision(DATA))
    for g in tl.static_range(NUM_GATES):
        weights = _gate_row(IGATE_W, FGATE_W, g, which, chan, chans, INPUT_GATES, ACC)
        share = tl.sum(out * weights.to(DATA).to(ACC)[None, :], axis=1)
        gates += tl.where(gate[None, :] == g, share[:, None], 0.0)
    return gates


@triton.jit
def _project_and_store(src, W, B, IGATE_W, FGATE_W, QKV, gates, which, image, offs_t, groups, group_ok, chan, chans,
                       ok, NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Projection ``which`` (0 q, 1 k, 2 v; weight ``W``, bias ``B``) of ``src`` plus its bias, stored; returns
    ``gates`` plus its share."""
    out = _block_diagonal_tile(src, W, groups, group_ok, False, BLOCK_T, BLOCK_G, ACC)
    out += tl.load(B + chan, mask=chan < chans, other=0.0).to(ACC)[None, :]
    stored = out.to(QKV.dtype.element_ty)
    tl.store(_tile_ptrs(QKV, image * 3, offs_t, chan, 3 * chans, which * chans), stored, mask=ok)
    if NUM_GATES > 0:
        gates = _add_gate_products(gates, stored.to(ACC), IGATE_W, FGATE_W, which, chan, chans, NUM_GATES,
                                   INPUT_GATES, QKV.dtype.element_ty, ACC, BLOCK_T, BLOCK_G)
    return gates


@triton.jit
def conv_qkv_forward_kernel(X, CONV_W, CONV_B, Q_W, K_W, V_W, Q_B, K_B, V_B, IGATE_W, FGATE_W, IGATE_B, FGATE_B,
                            X_CONV, QKV, GATES, height, width, chans, x_row, total, KSIZE: tl.constexpr,
                            REVERSE: tl.constexpr, NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr,
                            STORE_PRE: tl.constexpr, PROJECT: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, LOOP_TAPS: tl.constexpr):
    """Grid: (token tiles of the ``total`` tokens of all images, flattened; channel tiles). Writes silu(conv(x)),
    q | k | v, and this channel tile's share of the gate pre-activations, ``GATES[channel tile, image, gate, token]``
    (the caller sums the shares; tile 0 adds the biases). Each projection's weight and bias, and the input and forget
    gates' weights and biases, are separate tensors (the modules' parameters as they are): the first ``INPUT_GATES``
    gates are those of ``IGATE_W`` and ``IGATE_B``, the rest those of ``FGATE_W`` and ``FGATE_B``. ``NUM_GATES = 0``:
    no gates. ``STORE_PRE`` (the backward's
    recomputation): X_CONV gets the conv's pre-activation instead, from which the backward kernels recompute
    silu(conv(x)) elementwise; ``PROJECT = False``: no q | k | v either.

    The conv's output (the pre-activation) is rounded to the activations' dtype before the SiLU, as the official model
    rounds it under autocast, so that the backward kernels recompute the same SiLU from the stored pre-activation.

    One projection at a time, stored and its gate share added before the next (few live tiles); x is read again for v
    (from the cache) rather than kept live through the conv and q, k. Tiles of 64 tokens or more with 4 warps make the
    gate products warp-group MMAs (``wgmma``).
    """
    first, local, image, in_image, row, col, valid = _flat_tile(total, height * width, width, BLOCK_T)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_ok = groups < chans // GROUP
    chan = _tile_channels(BLOCK_G)
    ok = valid[:, None] & (chan[None, :] < chans)
    x_ptrs = X + first * x_row + local[:, None] * x_row + chan[None, :]  # X: rows of x_row elements
    pre = _conv(x_ptrs, CONV_W, CONV_B, row, col, valid, chan, height, width, chans, x_row, KSIZE, REVERSE, ACC,
                LOOP_TAPS).to(X_CONV.dtype.element_ty)
    start = first * chans  # of the tile's first token in X_CONV; 3 * start in QKV
    act = silu(pre.to(ACC))
    if STORE_PRE:
        tl.store(_tile_ptrs(X_CONV, start, local, chan, chans, 0), pre, mask=ok)
    else:
        tl.store(_tile_ptrs(X_CONV, start, local, chan, chans, 0), act.to(X_CONV.dtype.element_ty), mask=ok)
    if PROJECT:
        _project_all(act, x_ptrs, Q_W, K_W, V_W, Q_B, K_B, V_B, IGATE_W, FGATE_W, IGATE_B, FGATE_B, QKV, GATES, start,
                     local, image, in_image, groups, group_ok, chan, chans, ok, valid, height, width, total, NUM_GATES,
                     INPUT_GATES, ACC, BLOCK_T, BLOCK_G)


@triton.jit
def _project_all(act, x_ptrs, Q_W, K_W, V_W, Q_B, K_B, V_B, IGATE_W, FGATE_W, IGATE_B, FGATE_B, QKV, GATES, start,
                 local, image, in_image, groups, group_ok, chan, chans, ok, valid, height, width, total,
                 NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """q, k (of ``act``) and v (of x, read again at ``x_ptrs``), stored, and the tile's share of the gates."""
    gate = tl.arange(0, _gate_block(NUM_GATES))
    gates = tl.zeros((BLOCK_T, _gate_block(NUM_GATES)), dtype=ACC)
    if NUM_GATES > 0:  # channel tile 0 adds the biases
        biases = _gate_biases(IGATE_B, FGATE_B, NUM_GATES, INPUT_GATES, ACC)
        gates += tl.where(tl.program_id(1) == 0, biases, 0.0)[None, :]
    gates = _project_and_store(act, Q_W, Q_B, IGATE_W, FGATE_W, QKV, gates, 0, start, local, groups, group_ok, chan,
                               chans, ok, NUM_GATES, INPUT_GATES, ACC, BLOCK_T, BLOCK_G)
    gates = _project_and_store(act, K_W, K_B, IGATE_W, FGATE_W, QKV, gates, 1, start, local, groups, group_ok, chan,
                               chans, ok, NUM_GATES, INPUT_GATES, ACC, BLOCK_T, BLOCK_G)
    x = tl.load(x_ptrs, mask=ok, other=0.0).to(ACC)
    gates = _project_and_store(x, V_W, V_B, IGATE_W, FGATE_W, QKV, gates, 2, start, local, groups, group_ok, chan,
                               chans, ok, NUM_GATES, INPUT_GATES, ACC, BLOCK_T, BLOCK_G)  # v projects x
    if NUM_GATES > 0:
        n_tokens = height * width
        share = tl.program_id(1).to(tl.int64) * NUM_GATES * total
        tl.store(GATES + share + (image * (NUM_GATES * n_tokens) + in_image)[:, None] + gate[None, :] * n_tokens,
                 gates, mask=(gate[None, :] < NUM_GATES) & valid[:, None])


@triton.jit
def _walk_setup(height, width, chans, KSIZE: tl.constexpr, NUM_GATES: tl.constexpr, BLOCK_G: tl.constexpr):
    """Channel groups, channels, image offset and partial row of a backward program (grid: token ranges, groups,
    batch). A partial row: ``[conv weight | conv bias | qkv weight | qkv bias | gate weight | gate bias]``."""
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    image = tl.program_id(2).to(tl.int64) * height * width * chans
    row_len = chans * (KSIZE * KSIZE + 1) + 3 * chans * GROUP + 3 * chans + NUM_GATES * (3 * chans + 1)
    part_row = (tl.program_id(2).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * row_len
    return groups, groups < chans // GROUP, _tile_channels(BLOCK_G), image, part_row


@triton.jit
def _walk_range(n_tokens, BLOCK_T: tl.constexpr, TILES: tl.constexpr):
    """The token tiles this program walks: ``TILES`` of them, fewer at the end of the image."""
    first = tl.program_id(0) * TILES
    return first, tl.minimum(first + TILES, tl.cdiv(n_tokens, BLOCK_T))


@triton.jit
def _walk_tile(tile, n_tokens, chan, chans, BLOCK_T: tl.constexpr):
    """Tokens of token tile ``tile`` and the mask of the ``(tokens, channels)`` tile."""
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    return offs_t, (offs_t[:, None] < n_tokens) & (chan[None, :] < chans)


@triton.jit
def _gate_share(GRAD_GATES, IGATE_W, FGATE_W, which, offs_t, chan, chans, stride_gate_b, stride_gate_g, stride_gate_n,
                n_tokens, NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr, ACC: tl.constexpr):
    """What reached projection ``which`` (0 q, 1 k, 2 v) through the gate pre-activations on a ``(tokens, channels)``
    tile: ``sum_g grad_gate[g] * gate_weight[g, which's channels]``."""
    gates = GRAD_GATES + tl.program_id(2).to(tl.int64) * stride_gate_b + offs_t * stride_gate_n
    share = tl.zeros((offs_t.shape[0], chan.shape[0]), dtype=ACC)
    for gate in tl.static_range(NUM_GATES):
        grad_gate = tl.load(gates + gate * stride_gate_g, mask=offs_t < n_tokens, other=0.0).to(ACC)
        share += grad_gate[:, None] * _gate_row(IGATE_W, FGATE_W, gate, which, chan, chans, INPUT_GATES, ACC)[None, :]
    return share


@triton.jit
def _qkv_grad(GRAD_QKV, GRAD_GATES, IGATE_W, FGATE_W, which, image, offs_t, chan, chans, ok, stride_gate_b,
              stride_gate_g, stride_gate_n, n_tokens, NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr,
              ACC: tl.constexpr):
    """The gradient of projection ``which`` on a ``(tokens, channels)`` tile: what reached it from the mLSTM
    (GRAD_QKV) plus its gate share."""
    return (_load_tile(GRAD_QKV, image * 3, offs_t, chan, 3 * chans, which * chans, ok, ACC)
            + _gate_share(GRAD_GATES, IGATE_W, FGATE_W, which, offs_t, chan, chans, stride_gate_b, stride_gate_g,
                          stride_gate_n, n_tokens, NUM_GATES, INPUT_GATES, ACC))


@triton.jit
def conv_qkv_backward_kernel(PRE, Q_W, K_W, IGATE_W, FGATE_W, GRAD_X_CONV, GRAD_QKV, GRAD_GATES, GRAD_PRE, PARTIAL,
                             height, width, chans, stride_gate_b, stride_gate_g, stride_gate_n, KSIZE: tl.constexpr,
                             NUM_GATES: tl.constexpr, INPUT_GATES: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, TILES: tl.constexpr):
    """Launch 1 of the backward (module docstring): grad_pre, and the partial sums of the conv bias and q/k weight
    and bias gradients, from the conv's pre-activation PRE (the forward kernel's ``STORE_PRE``). PARTIAL: one row per
    program (``_walk_setup``), of which launches 2 and 3 write the other columns. The gradients of q and k are
    GRAD_QKV plus the gates' share, ``gate_weight^T GRAD_GATES``."""
    groups, group_ok, chan, image, part_row = _walk_setup(height, width, chans, KSIZE, NUM_GATES, BLOCK_G)
    n_tokens = height * width
    first_tile, end_tile = _walk_range(n_tokens, BLOCK_T, TILES)
    zero = tl.zeros((BLOCK_T, BLOCK_G * GROUP), dtype=ACC)
    bias_conv, bias_q, bias_k = zero, zero, zero
    wq0, wq1, wq2, wq3 = zero, zero, zero, zero
    wk0, wk1, wk2, wk3 = zero, zero, zero, zero
    for tile in range(first_tile, end_tile):
        offs_t, ok = _walk_tile(tile, n_tokens, chan, chans, BLOCK_T)
        dq = _qkv_grad(GRAD_QKV, GRAD_GATES, IGATE_W, FGATE_W, 0, image, offs_t, chan, chans, ok, stride_gate_b,
                       stride_gate_g, stride_gate_n, n_tokens, NUM_GATES, INPUT_GATES, ACC)
        dk = _qkv_grad(GRAD_QKV, GRAD_GATES, IGATE_W, FGATE_W, 1, image, offs_t, chan, chans, ok, stride_gate_b,
                       stride_gate_g, stride_gate_n, n_tokens, NUM_GATES, INPUT_GATES, ACC)
        pre = _load_tile(PRE, image, offs_t, chan, chans, 0, ok, ACC)
        sig = tl.sigmoid(pre)
        act = silu(pre)
        grad_act = (_load_tile(GRAD_X_CONV, image, offs_t, chan, chans, 0, ok, ACC)
                    + _block_diagonal_tile(dq, Q_W, groups, group_ok, True, BLOCK_T, BLOCK_G, ACC)
                    + _block_diagonal_tile(dk, K_W, groups, group_ok, True, BLOCK_T, BLOCK_G, ACC))
        # Rounded to GRAD_PRE's dtype once: the conv bias, weight and input gradients all see the stored value.
        grad_pre = tl.where(ok, grad_act * sig * (1 + pre * (1 - sig)), 0.0).to(GRAD_PRE.dtype.element_ty)
        tl.store(_tile_ptrs(GRAD_PRE, image, offs_t, chan, chans, 0), grad_pre, mask=ok)
        bias_conv += grad_pre.to(ACC)
        bias_q += dq
        bias_k += dk
        wq0, wq1, wq2, wq3 = _add_outer(wq0, wq1, wq2, wq3, dq, act, BLOCK_T, BLOCK_G)
        wk0, wk1, wk2, wk3 = _add_outer(wk0, wk1, wk2, wk3, dk, act, BLOCK_T, BLOCK_G)
    chan_ok = chan < chans
    row = PARTIAL + part_row + chans * KSIZE * KSIZE
    tl.store(row + chan, tl.sum(bias_conv, axis=0), mask=chan_ok)
    weights = row + chans
    _store_weight_sums(weights, chan, chan_ok, wq0, wq1, wq2, wq3)
    _store_weight_sums(weights + chans * GROUP, chan, chan_ok, wk0, wk1, wk2, wk3)
    biases = weights + 3 * chans * GROUP + chan
    tl.store(biases, tl.sum(bias_q, axis=0), mask=chan_ok)
    tl.store(biases + chans, tl.sum(bias_k, axis=0), mask=chan_ok)


@triton.jit
def _grad_pre_at(ptrs, row, col, valid, chan_ok, tap_y, tap_x, height, width, chans, KSIZE: tl.constexpr,
                 ACC: tl.constexpr):
    """``dpre[s - d]`` (the tile of GRAD_PRE at ``ptrs``) for tap ``(tap_y, tap_x)`` with offset ``d``: the tap
    rotated by 180 degrees."""
    return _shifted(ptrs, row, col, valid, chan_ok, KSIZE // 2 - tap_y, KSIZE // 2 - tap_x, height, width, chans, ACC)


@triton.jit
def _add_at(tiles, index: tl.constexpr, term):
    """The tuple ``tiles`` with ``term`` added to its entry ``index`` (tuples are immutable; the index is static,
    so each entry stays in registers of its own)."""
    return tiles[:index] + (tiles[index] + term,) + tiles[index + 1:]


@triton.jit
def conv_qkv_input_grad_kernel(GRAD_PRE, X, CONV_W, V_W, IGATE_W, FGATE_W, GRAD_QKV, GRAD_GATES, GRAD_X, PARTIAL,
                               height, width, chans, x_row, stride_gate_b, stride_gate_g, stride_gate_n,
                               KSIZE: tl.constexpr, REVERSE: tl.constexpr, NUM_GATES: tl.constexpr,
                               INPUT_GATES: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_G: tl.constexpr, TILES: tl.constexpr):
    """Launch 2 of the backward: dx = transposed depthwise conv of the pre-activation gradient + v's block^T dv, and
    the partial sums of the conv weight and the v weight and bias gradients (columns of launch 1's PARTIAL rows).

    Forward ``pre[t] = sum_d w[d] x[t + d]`` gives ``dx[s] = sum_d w[d] dpre[s - d]`` and
    ``dw[d] = sum_s x[s] dpre[s - d]``: the same shifted ``dpre`` for both, so one walk over the program's tiles loads
    each tile's x and each tap's shifted dpre once, adds it to dx and its product with x to the tap's accumulator
    (``tap_sums``: one ``(tokens, channels)`` register tile per tap, summed across threads once at the end).
    """
    groups, group_ok, chan, image, part_row = _walk_setup(height, width, chans, KSIZE, NUM_GATES, BLOCK_G)
    x_image = tl.program_id(2).to(tl.int64) * height * width * x_row  # X and GRAD_X: rows of x_row elements
    n_tokens = height * width
    first_tile, end_tile = _walk_range(n_tokens, BLOCK_T, TILES)
    zero = tl.zeros((BLOCK_T, BLOCK_G * GROUP), dtype=ACC)
    bias_v, wv0, wv1, wv2, wv3 = zero, zero, zero, zero, zero
    tap_sums = (zero,) * (KSIZE * KSIZE)  # entry tap_y * KSIZE + tap_x
    chan_ok = chan < chans
    for tile in range(first_tile, end_tile):
        offs_t, ok = _walk_tile(tile, n_tokens, chan, chans, BLOCK_T)
        row, col = _grid_position(offs_t, width)
        valid = offs_t < n_tokens
        grad_pre_ptrs = _tile_ptrs(GRAD_PRE, image, offs_t, chan, chans, 0)
        x = _load_tile(X, x_image, offs_t, chan, x_row, 0, ok, ACC)
        dv = _qkv_grad(GRAD_QKV, GRAD_GATES, IGATE_W, FGATE_W, 2, image, offs_t, chan, chans, ok, stride_gate_b,
                       stride_gate_g, stride_gate_n, n_tokens, NUM_GATES, INPUT_GATES, ACC)
        bias_v += dv
        wv0, wv1, wv2, wv3 = _add_outer(wv0, wv1, wv2, wv3, dv, x, BLOCK_T, BLOCK_G)  # v projects x
        grad = _block_diagonal_tile(dv, V_W, groups, group_ok, True, BLOCK_T, BLOCK_G, ACC)
        for tap_y in tl.static_range(KSIZE):
            for tap_x in tl.static_range(KSIZE):
                grad_pre = _grad_pre_at(grad_pre_ptrs, row, col, valid, chan_ok, tap_y, tap_x, height, width, chans,
                                        KSIZE, ACC)
                grad += _conv_weight(CONV_W, chan, chans, tap_y, tap_x, KSIZE, REVERSE, ACC) * grad_pre
                tap_sums = _add_at(tap_sums, tap_y * KSIZE + tap_x, x * grad_pre)
        tl.store(_tile_ptrs(GRAD_X, x_image, offs_t, chan, x_row, 0), grad.to(GRAD_X.dtype.element_ty), mask=ok)
    for tap_y in tl.static_range(KSIZE):
        for tap_x in tl.static_range(KSIZE):
            tl.store(PARTIAL + part_row + chan * (KSIZE * KSIZE) + _kernel_index(tap_y, tap_x, KSIZE, REVERSE),
                     tl.sum(tap_sums[tap_y * KSIZE + tap_x], axis=0), mask=chan_ok)
    weights = PARTIAL + part_row + chans * (KSIZE * KSIZE + 1)
    _store_weight_sums(weights + 2 * chans * GROUP, chan, chan_ok, wv0, wv1, wv2, wv3)
    tl.store(weights + 3 * chans * GROUP + 2 * chans + chan, tl.sum(bias_v, axis=0), mask=chan_ok)


@triton.jit
def _add_gate_weight_terms(acc, grad_gates, src, NUM_GATES: tl.constexpr, DATA: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """``acc (gate block, channels) + grad_gates^T @ src`` for a ``(tokens, gate block)`` tile of gate gradients and a
    ``(tokens, channels)`` tile of one projection's output: a ``tl.dot`` where :func:`_gate_dots` allows (exact
    products of 16-bit values), else a reduction over the tokens per gate."""
    if _gate_dots(ACC, BLOCK_T, BLOCK_G):
        return tl.dot(tl.trans(grad_gates), src, acc, input_precision=_dot_precision(DATA))
    gate = tl.arange(0, _gate_block(NUM_GATES))
    for g in tl.static_range(NUM_GATES):
        column = tl.sum(tl.where(gate[None, :] == g, grad_gates, 0.0), axis=1)
        acc += tl.where(gate[:, None] == g, tl.sum(column[:, None] * src, axis=0)[None, :], 0.0)
    return acc


@triton.jit
def conv_qkv_gate_grad_kernel(QKV, GRAD_GATES, PARTIAL, height, width, chans, stride_gate_b, stride_gate_g,
                              stride_gate_n, KSIZE: tl.constexpr, NUM_GATES: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, TILES: tl.constexpr):
    """Launch 3 of the backward: the partial sums of the gate weight gradient ``grad_gates^T @ q | k | v`` (the gate
    gradient rounded to q | k | v's dtype: the official gate layer's 16-bit product under autocast) and, in channel
    tile 0, of the gate bias gradient (the sums of the unrounded gate gradients), as the last columns of launches 1
    and 2's PARTIAL rows (the same grid). ``QKV``: the forward's q | k | v, rows of ``3 * chans``."""
    _, _, chan, image, part_row = _walk_setup(height, width, chans, KSIZE, NUM_GATES, BLOCK_G)
    n_tokens = height * width
    first_tile, end_tile = _walk_range(n_tokens, BLOCK_T, TILES)
    gate = tl.arange(0, _gate_block(NUM_GATES))
    gates = GRAD_GATES + tl.program_id(2).to(tl.int64) * stride_gate_b + gate[None, :] * stride_gate_g
    DATA = QKV.dtype.element_ty
    weight_q = tl.zeros((_gate_block(NUM_GATES), BLOCK_G * GROUP), dtype=ACC)
    weight_k, weight_v = weight_q, weight_q
    bias = tl.zeros((BLOCK_T, _gate_block(NUM_GATES)), dtype=ACC)
    for tile in range(first_tile, end_tile):
        offs_t, ok = _walk_tile(tile, n_tokens, chan, chans, BLOCK_T)
        grad_gates = tl.load(gates + offs_t[:, None] * stride_gate_n,
                             mask=(offs_t[:, None] < n_tokens) & (gate[None, :] < NUM_GATES), other=0.0).to(ACC)
        bias += grad_gates
        rounded = grad_gates.to(DATA).to(ACC)
        weight_q = _add_gate_weight_terms(weight_q, rounded, _load_tile(QKV, image * 3, offs_t, chan, 3 * chans, 0, ok,
                                                                        ACC), NUM_GATES, DATA, ACC, BLOCK_T, BLOCK_G)
        weight_k = _add_gate_weight_terms(weight_k, rounded, _load_tile(QKV, image * 3, offs_t, chan, 3 * chans, chans,
                                                                        ok, ACC), NUM_GATES, DATA, ACC, BLOCK_T, BLOCK_G)
        weight_v = _add_gate_weight_terms(weight_v, rounded, _load_tile(QKV, image * 3, offs_t, chan, 3 * chans,
                                                                        2 * chans, ok, ACC),
                                          NUM_GATES, DATA, ACC, BLOCK_T, BLOCK_G)
    weights = PARTIAL + part_row + chans * (KSIZE * KSIZE + 1) + 3 * chans * GROUP + 3 * chans
    entry = weights + gate[:, None] * (3 * chans) + chan[None, :]
    stored = (gate[:, None] < NUM_GATES) & (chan[None, :] < chans)
    tl.store(entry, weight_q, mask=stored)
    tl.store(entry + chans, weight_k, mask=stored)
    tl.store(entry + 2 * chans, weight_v, mask=stored)
    tl.store(weights + NUM_GATES * 3 * chans + gate, tl.sum(bias, axis=0),
             mask=(gate < NUM_GATES) & (tl.program_id(1) == 0))
