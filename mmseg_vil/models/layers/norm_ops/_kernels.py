"""Triton kernels of the blocks' LayerNorm: statistics in the accumulator's dtype, output in the compute dtype.

A program normalises ``ROWS`` tokens of ``(tokens, D)`` rows. The forward writes the output straight in the dtype the
next product runs in (bf16 under autocast: no separate cast) and each row's mean and 1/std for the backward. Each
backward program walks ``TILES`` row tiles and writes its sums of the weight and bias gradient terms as one partial
row (summed by the caller: deterministic, no atomics).

With ``ADD_UPDATE`` the forward first adds a block's update to the residual stream and writes the sum (the next
block's norm fused with the previous block's residual add); with ``ADD_GRAD`` the backward adds the residual stream's
gradient to the input gradient and with ``STORE_UPDATE_GRAD`` also writes that sum in the update's dtype (the
gradient of both summands of the add).
"""
import triton
import triton.language as tl


@triton.jit
def _rows(tile, n_rows, dim, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    return rows, cols, rows.to(tl.int64)[:, None] * dim + cols[None, :], ok


@triton.jit
def layer_norm_forward_kernel(X, UPDATE, X_OUT, W, B, Y, MEAN, RSTD, n_rows, dim, EPS, HAS_BIAS: tl.constexpr,
                              ADD_UPDATE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Y = (X - mean) / sqrt(var + eps) * W (+ B)`` per row; ``EPS`` points to eps in the accumulator's dtype.
    ``ADD_UPDATE``: normalises ``X_OUT = X + UPDATE`` instead (the sum rounded to ``X``'s dtype, as PyTorch's add)."""
    rows, cols, offs, ok = _rows(tl.program_id(0), n_rows, dim, ROWS, BLOCK_D)
    x = tl.load(X + offs, mask=ok, other=0.0)
    if ADD_UPDATE:
        x = (x.to(ACC) + tl.load(UPDATE + offs, mask=ok, other=0.0).to(ACC)).to(X_OUT.dtype.element_ty)
        tl.store(X_OUT + offs, x, mask=ok)
    x = x.to(ACC)
    mean = tl.sum(x, axis=1) / dim
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + tl.load(EPS))
    col_ok = cols < dim
    y = centred * rstd[:, None] * tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=rows < n_rows)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def layer_norm_backward_kernel(X, W, MEAN, RSTD, GRAD_Y, GRAD_RES, GRAD_X, GRAD_UPDATE, PARTIAL, n_rows, dim,
                               ADD_GRAD: tl.constexpr, STORE_UPDATE_GRAD: tl.constexpr, ACC: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr):
    """``GRAD_X = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = GRAD_Y * W``, plus ``GRAD_RES`` if
    ``ADD_GRAD`` (each term rounded to ``GRAD_X``'s dtype first, as autograd accumulates them), also written to
    ``GRAD_UPDATE`` in its dtype if ``STORE_UPDATE_GRAD``; ``PARTIAL`` row of this program: ``[sum GRAD_Y * xhat |
    sum GRAD_Y]`` over its rows (weight and bias gradients)."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    weight = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    grad_w = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
    grad_b = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
    for tile in range(tl.program_id(0) * TILES, tl.program_id(0) * TILES + TILES):
        rows, cols, offs, ok = _rows(tile, n_rows, dim, ROWS, BLOCK_D)
        row_ok = rows < n_rows
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (tl.load(X + offs, mask=ok, other=0.0).to(ACC) - mean[:, None]) * rstd[:, None], 0.0)
        grad_y = tl.load(GRAD_Y + offs, mask=ok, other=0.0).to(ACC)
        g = grad_y * weight[None, :]
        grad_x = rstd[:, None] * (g - (tl.sum(g, axis=1)[:, None] + xhat * tl.sum(g * xhat, axis=1)[:, None]) / dim)
        grad_x = grad_x.to(GRAD_X.dtype.element_ty)
        if ADD_GRAD:
            grad_x = (grad_x.to(ACC) + tl.load(GRAD_RES + offs, mask=ok, other=0.0).to(ACC)).to(
                GRAD_X.dtype.element_ty)
        tl.store(GRAD_X + offs, grad_x, mask=ok)
        if STORE_UPDATE_GRAD:
            tl.store(GRAD_UPDATE + offs, grad_x.to(GRAD_UPDATE.dtype.element_ty), mask=ok)
        grad_w += grad_y * xhat
        grad_b += grad_y
    partial = PARTIAL + tl.program_id(0).to(tl.int64) * 2 * dim
    tl.store(partial + cols, tl.sum(grad_w, axis=0), mask=col_ok)
    tl.store(partial + dim + cols, tl.sum(grad_b, axis=0), mask=col_ok)
