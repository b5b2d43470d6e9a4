"""Triton kernels of :func:`~.reference.gated_output`: per-head LayerNorm + affine + skip + SiLU gate in one pass.

A program owns a tile of tokens and one head, i.e. exactly the channels one LayerNorm reduces over. ``h`` is read
through its strides (the mLSTM backends return ``(B, NH, N, DH)`` or ``(B, N, NH, DH)`` storage); everything else is
``(B, N, E)`` contiguous. The backward recomputes the statistics; each of its programs walks ``TILES`` token tiles,
adds the weight-gradient terms into register tiles and writes their sums as one partial row (summed by the caller:
deterministic, no atomics).
"""
import triton
import triton.language as tl


@triton.jit
def _offsets(tile, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row, head_dim, BLOCK_T: tl.constexpr,
             BLOCK_D: tl.constexpr):
    tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    token_ok = tokens < n_tokens
    ok = token_ok[:, None] & (dims[None, :] < head_dim)
    batch, step = tokens // seq_len, tokens % seq_len
    h_offs = (batch.to(tl.int64) * stride_b + step.to(tl.int64) * stride_n)[:, None] + head * stride_h + dims[None, :]
    chan = head * head_dim + dims
    flat = tokens.to(tl.int64)[:, None] * chans + chan[None, :]
    return h_offs, flat, tokens.to(tl.int64)[:, None] * z_row + chan[None, :], ok


@triton.jit
def _normalise(h, ok, head_dim, eps):
    mean = tl.sum(h, axis=1) / head_dim
    centred = tl.where(ok, h - mean[:, None], 0.0)
    rstd = 1 / tl.sqrt(tl.sum(centred * centred, axis=1) / head_dim + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def _parameters(NORM_W, NORM_B, SKIP, head_dim, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """This head's norm weight, norm bias and skip as ``(1, head dims)`` rows, in the tiles' layout: loaded once per
    program (a 1-D load would be converted to the tiles' layout through shared memory at each use)."""
    dims = tl.arange(0, BLOCK_D)[None, :]
    chan, ok = tl.program_id(1) * head_dim + dims, dims < head_dim
    return (tl.load(NORM_W + chan, mask=ok, other=0.0).to(ACC), tl.load(NORM_B + chan, mask=ok, other=0.0).to(ACC),
            tl.load(SKIP + chan, mask=ok, other=0.0).to(ACC))


@triton.jit
def _load_inputs(tile, H, X_CONV, Z, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row, head_dim, EPS,
                 ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and masks of token tile ``tile``, its normalised heads with their 1/std, x_conv, z. ``z`` (and its
    gradient) has rows of ``z_row`` elements: e.g. the second half of the up-projection's output.

    ``EPS`` points to the norm's eps in the accumulator's dtype: a float argument would arrive as float32 and shift
    float64 results of low-variance heads by up to ~1e-7 relative."""
    h_offs, flat, z_offs, ok = _offsets(tile, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row,
                                        head_dim, BLOCK_T, BLOCK_D)
    normed, rstd = _normalise(tl.load(H + h_offs, mask=ok, other=0.0).to(ACC), ok, head_dim, tl.load(EPS))
    x_conv = tl.load(X_CONV + flat, mask=ok, other=0.0).to(ACC)
    z = tl.load(Z + z_offs, mask=ok, other=0.0).to(ACC)
    return h_offs, flat, z_offs, ok, normed, rstd, x_conv, z


@triton.jit
def gated_output_forward_kernel(H, X_CONV, Z, NORM_W, NORM_B, SKIP, OUT, stride_b, stride_n, stride_h, seq_len,
                                n_tokens, chans, z_row, head_dim, EPS, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """Grid: (token tiles over the B * N tokens, heads). ``out = (norm(h) * w + b + skip * x_conv) * silu(z)``."""
    weight, bias, skip = _parameters(NORM_W, NORM_B, SKIP, head_dim, ACC, BLOCK_D)
    h_offs, flat, z_offs, ok, normed, rstd, x_conv, z = _load_inputs(
        tl.program_id(0), H, X_CONV, Z, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row, head_dim, EPS,
        ACC, BLOCK_T, BLOCK_D)
    out = (normed * weight + bias + skip * x_conv) * (z * tl.sigmoid(z))
    tl.store(OUT + flat, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def gated_output_backward_kernel(H, X_CONV, Z, NORM_W, NORM_B, SKIP, GRAD_OUT, GRAD_H, GRAD_X_CONV, GRAD_Z, PARTIAL,
                                 OUT, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row, head_dim, EPS,
                                 ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                 TILES: tl.constexpr, STORE_OUT: tl.constexpr):
    """Gradients of h (in h's strides), x_conv and z over ``TILES`` token tiles; one PARTIAL row per program:
    ``[d norm_w | d norm_b | d skip]``. ``STORE_OUT``: also the forward's output (recomputed on the way), for a
    caller that did not keep it."""
    weight, bias, skip = _parameters(NORM_W, NORM_B, SKIP, head_dim, ACC, BLOCK_D)
    grad_weight = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    grad_bias = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    grad_skip = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    end_tile = tl.minimum((tl.program_id(0) + 1) * TILES, tl.cdiv(n_tokens, BLOCK_T))
    for tile in range(tl.program_id(0) * TILES, end_tile):
        h_offs, flat, z_offs, ok, normed, rstd, x_conv, z = _load_inputs(
            tile, H, X_CONV, Z, stride_b, stride_n, stride_h, seq_len, n_tokens, chans, z_row, head_dim, EPS, ACC,
            BLOCK_T, BLOCK_D)
        grad_out = tl.load(GRAD_OUT + flat, mask=ok, other=0.0).to(ACC)
        sig = tl.sigmoid(z)
        grad_gated = grad_out * (z * sig)  # gradient of the gated sum
        gated_sum = normed * weight + bias + skip * x_conv
        if STORE_OUT:
            tl.store(OUT + flat, (gated_sum * (z * sig)).to(OUT.dtype.element_ty), mask=ok)
        tl.store(GRAD_Z + z_offs, (grad_out * gated_sum * sig * (1 + z * (1 - sig))).to(GRAD_Z.dtype.element_ty),
                 mask=ok)
        tl.store(GRAD_X_CONV + flat, (grad_gated * skip).to(GRAD_X_CONV.dtype.element_ty), mask=ok)
        grad_normed = grad_gated * weight
        mean_grad = tl.sum(grad_normed, axis=1) / head_dim
        mean_grad_normed = tl.sum(grad_normed * normed, axis=1) / head_dim
        grad_h = (grad_normed - mean_grad[:, None] - normed * mean_grad_normed[:, None]) * rstd[:, None]
        tl.store(GRAD_H + h_offs, grad_h.to(GRAD_H.dtype.element_ty), mask=ok)
        grad_weight += grad_gated * normed
        grad_bias += grad_gated
        grad_skip += grad_gated * x_conv
    chan = tl.program_id(1) * head_dim + tl.arange(0, BLOCK_D)
    chan_ok = tl.arange(0, BLOCK_D) < head_dim
    row = PARTIAL + tl.program_id(0).to(tl.int64) * 3 * chans
    tl.store(row + chan, tl.sum(grad_weight, axis=0), mask=chan_ok)
    tl.store(row + chans + chan, tl.sum(grad_bias, axis=0), mask=chan_ok)
    tl.store(row + 2 * chans + chan, tl.sum(grad_skip, axis=0), mask=chan_ok)
