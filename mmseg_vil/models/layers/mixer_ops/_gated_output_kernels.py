"""Triton kernels of :func:`~.reference.gated_output`: per-head LayerNorm + affine + skip + SiLU gate in one pass.

A program owns a tile of tokens and one head, i.e. exactly the channels one LayerNorm reduces over. ``h`` is read
through its strides (the mLSTM backends return ``(B, NH, N, DH)`` or ``(B, N, NH, DH)`` storage); everything else is
``(B, N, E)`` contiguous. The backward recomputes the statistics; each of its programs walks ``TILES`` token tiles,
adds the weight-gradient terms into register tiles and writes their sums as one partial row (summed by the caller:
deterministic, no atomics).

Triton tiles are a power of two wide and the ViL head dims are not (3 * 2^k: 96, 192, 384): one tile of 128 lanes for
a head of 96 leaves a quarter of them masked, idle but holding registers. Such a head is held as ``PARTS = 3`` tiles
of ``BLOCK_D = 2^k`` dims whose per-token sums (mean, variance, the backward's two row sums) are added. Three equal
parts rather than two powers of two (96 = 64 + 32): tiles of one shape share one register layout, while Triton gives
tiles of two widths two layouts and moves whole tiles between them through shared memory around the per-token sums
(Triton 3.8, sm_90, ViL-T in bfloat16: 12 layout conversions in the backward's loop, 230 registers; three parts: none,
166 registers, against 217 for the padded tile). ``PARTS = 1``: a power-of-two head or, for any other head dim, one
tile padded past the head (the only case with masked dims).
"""
import triton
import triton.language as tl

from ._conv_qkv_kernels import silu


@triton.jit
def _part_offsets(tile, START: tl.constexpr, WIDTH: tl.constexpr, stride_b, stride_n, stride_h, seq_len, n_tokens,
                  chans, z_row, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Offsets of head dims ``START .. START + WIDTH`` of token tile ``tile`` in h (its strides), in the ``(B, N, E)``
    tensors and in z (rows of ``z_row``), and their mask: tokens past the end, and dims past the head only in a padded
    part (the mask of an exact part is constant along the dims, so loads and stores stay vectors)."""
    tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    dims = START + tl.arange(0, WIDTH)
    ok = (tokens < n_tokens)[:, None]
    if START + WIDTH > HEAD_DIM:
        ok = ok & (dims < HEAD_DIM)[None, :]
    batch, step = tokens // seq_len, tokens % seq_len
    h_offs = (batch.to(tl.int64) * stride_b + step.to(tl.int64) * stride_n)[:, None] + head * stride_h + dims[None, :]
    chan = (head * HEAD_DIM + dims)[None, :]
    rows = tokens.to(tl.int64)[:, None]
    return h_offs, rows * chans + chan, rows * z_row + chan, ok


@triton.jit
def _parameters(NORM_W, NORM_B, SKIP, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                ACC: tl.constexpr):
    """This head's norm weight, norm bias and skip over one part as ``(1, WIDTH)`` rows, in the tiles' layout: loaded
    once per program (a 1-D load would be converted to the tiles' layout through shared memory at each use)."""
    dims = START + tl.arange(0, WIDTH)[None, :]
    chan, ok = tl.program_id(1) * HEAD_DIM + dims, dims < HEAD_DIM
    return (tl.load(NORM_W + chan, mask=ok, other=0.0).to(ACC), tl.load(NORM_B + chan, mask=ok, other=0.0).to(ACC),
            tl.load(SKIP + chan, mask=ok, other=0.0).to(ACC))


@triton.jit
def _load_part(tile, START: tl.constexpr, WIDTH: tl.constexpr, H, X_CONV, Z, stride_b, stride_n, stride_h, seq_len,
               n_tokens, chans, z_row, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
               X_CONV_FROM_PRE: tl.constexpr = False):
    """Offsets, mask, h, x_conv and z of one part of a token tile: every load is issued before the statistics wait
    on h. ``X_CONV_FROM_PRE``: X_CONV holds the conv's pre-activation, x_conv is its SiLU as the conv kernel
    rounds it."""
    h_offs, flat, z_offs, ok = _part_offsets(tile, START, WIDTH, stride_b, stride_n, stride_h, seq_len, n_tokens,
                                             chans, z_row, HEAD_DIM, BLOCK_T)
    h = tl.load(H + h_offs, mask=ok, other=0.0).to(ACC)
    x_conv = tl.load(X_CONV + flat, mask=ok, other=0.0).to(ACC)
    if X_CONV_FROM_PRE:
        x_conv = silu(x_conv).to(X_CONV.dtype.element_ty).to(ACC)  # as the conv kernel stores it
    z = tl.load(Z + z_offs, mask=ok, other=0.0).to(ACC)
    return h_offs, flat, z_offs, ok, h, x_conv, z


@triton.jit
def _centre(h, ok, mean):
    """One part of h less its token's mean (0 in masked lanes) and the part's per-token sum of squares."""
    centred = tl.where(ok, h - mean[:, None], 0.0)
    return centred, tl.sum(centred * centred, axis=1)


@triton.jit
def _rstd(squares, HEAD_DIM: tl.constexpr, EPS):
    """1/std from the head's per-token sum of squares. ``EPS`` points to the norm's eps in the accumulator's dtype: a
    float argument would arrive as float32 and shift float64 results of low-variance heads by up to ~1e-7 relative."""
    return 1 / tl.sqrt(squares / HEAD_DIM + tl.load(EPS))


@triton.jit
def _forward_part(OUT, flat, ok, normed, x_conv, z, weight, bias, skip):
    out = (normed * weight + bias + skip * x_conv) * (z * tl.sigmoid(z))
    tl.store(OUT + flat, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def gated_output_forward_kernel(H, X_CONV, Z, NORM_W, NORM_B, SKIP, OUT, stride_b, stride_n, stride_h, seq_len,
                                n_tokens, chans, z_row, HEAD_DIM: tl.constexpr, EPS, ACC: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PARTS: tl.constexpr):
    """Grid: (token tiles over the B * N tokens, heads). ``out = (norm(h) * w + b + skip * x_conv) * silu(z)``.
    Names ending in 0, 1, 2 belong to the head's parts."""
    tile = tl.program_id(0)
    weight0, bias0, skip0 = _parameters(NORM_W, NORM_B, SKIP, 0, BLOCK_D, HEAD_DIM, ACC)
    _, flat0, _, ok0, h0, x_conv0, z0 = _load_part(tile, 0, BLOCK_D, H, X_CONV, Z, stride_b, stride_n, stride_h,
                                                   seq_len, n_tokens, chans, z_row, HEAD_DIM, ACC, BLOCK_T)
    row_sum = tl.sum(h0, axis=1)
    if PARTS == 3:
        weight1, bias1, skip1 = _parameters(NORM_W, NORM_B, SKIP, BLOCK_D, BLOCK_D, HEAD_DIM, ACC)
        weight2, bias2, skip2 = _parameters(NORM_W, NORM_B, SKIP, 2 * BLOCK_D, BLOCK_D, HEAD_DIM, ACC)
        _, flat1, _, ok1, h1, x_conv1, z1 = _load_part(tile, BLOCK_D, BLOCK_D, H, X_CONV, Z, stride_b, stride_n,
                                                       stride_h, seq_len, n_tokens, chans, z_row, HEAD_DIM, ACC,
                                                       BLOCK_T)
        _, flat2, _, ok2, h2, x_conv2, z2 = _load_part(tile, 2 * BLOCK_D, BLOCK_D, H, X_CONV, Z, stride_b, stride_n,
                                                       stride_h, seq_len, n_tokens, chans, z_row, HEAD_DIM, ACC,
                                                       BLOCK_T)
        row_sum += tl.sum(h1, axis=1) + tl.sum(h2, axis=1)
    mean = row_sum / HEAD_DIM
    centred0, squares = _centre(h0, ok0, mean)
    if PARTS == 3:
        centred1, squares1 = _centre(h1, ok1, mean)
        centred2, squares2 = _centre(h2, ok2, mean)
        squares += squares1 + squares2
    rstd = _rstd(squares, HEAD_DIM, EPS)[:, None]
    _forward_part(OUT, flat0, ok0, centred0 * rstd, x_conv0, z0, weight0, bias0, skip0)
    if PARTS == 3:
        _forward_part(OUT, flat1, ok1, centred1 * rstd, x_conv1, z1, weight1, bias1, skip1)
        _forward_part(OUT, flat2, ok2, centred2 * rstd, x_conv2, z2, weight2, bias2, skip2)


@triton.jit
def _backward_part(OUT, GRAD_Z, GRAD_X_CONV, flat, z_offs, ok, normed, x_conv, z, grad_out, weight, bias, skip,
                   STORE_OUT: tl.constexpr):
    """One part's gradients of z and x_conv (stored; and the output if ``STORE_OUT``), the gradients of the gated sum
    and of the normed head, and the latter's two per-token sums that the gradient of h needs (over the whole head)."""
    sig = tl.sigmoid(z)
    grad_gated = grad_out * (z * sig)  # gradient of the gated sum
    gated_sum = normed * weight + bias + skip * x_conv
    if STORE_OUT:
        tl.store(OUT + flat, (gated_sum * (z * sig)).to(OUT.dtype.element_ty), mask=ok)
    tl.store(GRAD_Z + z_offs, (grad_out * gated_sum * sig * (1 + z * (1 - sig))).to(GRAD_Z.dtype.element_ty),
             mask=ok)
    tl.store(GRAD_X_CONV + flat, (grad_gated * skip).to(GRAD_X_CONV.dtype.element_ty), mask=ok)
    grad_normed = grad_gated * weight
    return grad_gated, grad_normed, tl.sum(grad_normed, axis=1), tl.sum(grad_normed * normed, axis=1)


@triton.jit
def _finish_part(GRAD_H, h_offs, ok, normed, x_conv, grad_gated, grad_normed, mean_grad, mean_grad_normed, rstd,
                 grad_weight, grad_bias, grad_skip):
    """One part's gradient of h (stored) from the head's per-token means; its weight-gradient terms added to the
    register tiles ``grad_weight``, ``grad_bias``, ``grad_skip`` (returned)."""
    grad_h = (grad_normed - mean_grad[:, None] - normed * mean_grad_normed[:, None]) * rstd[:, None]
    tl.store(GRAD_H + h_offs, grad_h.to(GRAD_H.dtype.element_ty), mask=ok)
    return grad_weight + grad_gated * normed, grad_bias + grad_gated, grad_skip + grad_gated * x_conv


@triton.jit
def _store_partial(row, chans, grad_weight, grad_bias, grad_skip, START: tl.constexpr, WIDTH: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
    """One part's share of the program's PARTIAL row ``[d norm_w | d norm_b | d skip]``."""
    dims = START + tl.arange(0, WIDTH)
    chan, ok = tl.program_id(1) * HEAD_DIM + dims, dims < HEAD_DIM
    tl.store(row + chan, tl.sum(grad_weight, axis=0), mask=ok)
    tl.store(row + chans + chan, tl.sum(grad_bias, axis=0), mask=ok)
    tl.store(row + 2 * chans + chan, tl.sum(grad_skip, axis=0), mask=ok)


@triton.jit
def gated_output_backward_kernel(H, X_CONV, Z, NORM_W, NORM_B, SKIP, GRAD_OUT, GRAD_H, GRAD_X_CONV, GRAD_Z, PARTIAL,
                                 OUT, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row,
                                 HEAD_DIM: tl.constexpr, EPS, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                                 BLOCK_D: tl.constexpr, PARTS: tl.constexpr, TILES: tl.constexpr,
                                 STORE_OUT: tl.constexpr, X_CONV_FROM_PRE: tl.constexpr):
    """Gradients of h (in h's strides), x_conv and z over ``TILES`` token tiles; one PARTIAL row per program:
    ``[d norm_w | d norm_b | d skip]``. ``STORE_OUT``: also the forward's output (recomputed on the way), for a
    caller that did not keep it. ``X_CONV_FROM_PRE``: X_CONV holds the conv's pre-activation (the backward's
    recomputation). Names ending in 0, 1, 2 belong to the head's parts."""
    weight0, bias0, skip0 = _parameters(NORM_W, NORM_B, SKIP, 0, BLOCK_D, HEAD_DIM, ACC)
    grad_weight0 = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    grad_bias0, grad_skip0 = grad_weight0, grad_weight0
    if PARTS == 3:
        weight1, bias1, skip1 = _parameters(NORM_W, NORM_B, SKIP, BLOCK_D, BLOCK_D, HEAD_DIM, ACC)
        weight2, bias2, skip2 = _parameters(NORM_W, NORM_B, SKIP, 2 * BLOCK_D, BLOCK_D, HEAD_DIM, ACC)
        grad_weight1, grad_bias1, grad_skip1 = grad_weight0, grad_weight0, grad_weight0
        grad_weight2, grad_bias2, grad_skip2 = grad_weight0, grad_weight0, grad_weight0
    end_tile = tl.minimum((tl.program_id(0) + 1) * TILES, tl.cdiv(n_tokens, BLOCK_T))
    for tile in range(tl.program_id(0) * TILES, end_tile):
        h_offs0, flat0, z_offs0, ok0, h0, x_conv0, z0 = _load_part(
            tile, 0, BLOCK_D, H, X_CONV, Z, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row, HEAD_DIM,
            ACC, BLOCK_T, X_CONV_FROM_PRE)
        grad_out0 = tl.load(GRAD_OUT + flat0, mask=ok0, other=0.0).to(ACC)
        row_sum = tl.sum(h0, axis=1)
        if PARTS == 3:
            h_offs1, flat1, z_offs1, ok1, h1, x_conv1, z1 = _load_part(
                tile, BLOCK_D, BLOCK_D, H, X_CONV, Z, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row,
                HEAD_DIM, ACC, BLOCK_T, X_CONV_FROM_PRE)
            h_offs2, flat2, z_offs2, ok2, h2, x_conv2, z2 = _load_part(
                tile, 2 * BLOCK_D, BLOCK_D, H, X_CONV, Z, stride_b, stride_n, stride_h, seq_len, n_tokens, chans,
                z_row, HEAD_DIM, ACC, BLOCK_T, X_CONV_FROM_PRE)
            grad_out1 = tl.load(GRAD_OUT + flat1, mask=ok1, other=0.0).to(ACC)
            grad_out2 = tl.load(GRAD_OUT + flat2, mask=ok2, other=0.0).to(ACC)
            row_sum += tl.sum(h1, axis=1) + tl.sum(h2, axis=1)
        mean = row_sum / HEAD_DIM
        normed0, squares = _centre(h0, ok0, mean)
        if PARTS == 3:
            normed1, squares1 = _centre(h1, ok1, mean)
            normed2, squares2 = _centre(h2, ok2, mean)
            squares += squares1 + squares2
        rstd = _rstd(squares, HEAD_DIM, EPS)
        normed0 *= rstd[:, None]
        grad_gated0, grad_normed0, grad_sum, grad_dot = _backward_part(
            OUT, GRAD_Z, GRAD_X_CONV, flat0, z_offs0, ok0, normed0, x_conv0, z0, grad_out0, weight0, bias0, skip0,
            STORE_OUT)
        if PARTS == 3:
            normed1 *= rstd[:, None]
            normed2 *= rstd[:, None]
            grad_gated1, grad_normed1, grad_sum1, grad_dot1 = _backward_part(
                OUT, GRAD_Z, GRAD_X_CONV, flat1, z_offs1, ok1, normed1, x_conv1, z1, grad_out1, weight1, bias1,
                skip1, STORE_OUT)
            grad_gated2, grad_normed2, grad_sum2, grad_dot2 = _backward_part(
                OUT, GRAD_Z, GRAD_X_CONV, flat2, z_offs2, ok2, normed2, x_conv2, z2, grad_out2, weight2, bias2,
                skip2, STORE_OUT)
            grad_sum += grad_sum1 + grad_sum2
            grad_dot += grad_dot1 + grad_dot2
        mean_grad, mean_grad_normed = grad_sum / HEAD_DIM, grad_dot / HEAD_DIM
        grad_weight0, grad_bias0, grad_skip0 = _finish_part(
            GRAD_H, h_offs0, ok0, normed0, x_conv0, grad_gated0, grad_normed0, mean_grad, mean_grad_normed, rstd,
            grad_weight0, grad_bias0, grad_skip0)
        if PARTS == 3:
            grad_weight1, grad_bias1, grad_skip1 = _finish_part(
                GRAD_H, h_offs1, ok1, normed1, x_conv1, grad_gated1, grad_normed1, mean_grad, mean_grad_normed, rstd,
                grad_weight1, grad_bias1, grad_skip1)
            grad_weight2, grad_bias2, grad_skip2 = _finish_part(
                GRAD_H, h_offs2, ok2, normed2, x_conv2, grad_gated2, grad_normed2, mean_grad, mean_grad_normed, rstd,
                grad_weight2, grad_bias2, grad_skip2)
    row = PARTIAL + tl.program_id(0).to(tl.int64) * 3 * chans
    _store_partial(row, chans, grad_weight0, grad_bias0, grad_skip0, 0, BLOCK_D, HEAD_DIM)
    if PARTS == 3:
        _store_partial(row, chans, grad_weight1, grad_bias1, grad_skip1, BLOCK_D, BLOCK_D, HEAD_DIM)
        _store_partial(row, chans, grad_weight2, grad_bias2, grad_skip2, 2 * BLOCK_D, BLOCK_D, HEAD_DIM)
