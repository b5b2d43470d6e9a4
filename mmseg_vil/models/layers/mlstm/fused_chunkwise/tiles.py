"""Memory layout of the chunkwise kernels: strided token tiles, head-dim blocks and the per-chunk state buffers.

q, k, v and the output gradient are read through their strides (any layout whose head-dim stride is 1, e.g. views of
a projection output ``(B, N, 3 NH DH)``). A chunk's tokens are read at ``positions``: step t of the scan is token t,
or token N-1-t when the direction is reversed, so the reversed cell needs no flipped copies. Outputs h, dq, dk, dv go
to contiguous ``(B, N, NH, DH)`` buffers and the gate gradients to ``(B, N, NH)``: the caller's
``transpose(1, 2).flatten(2)`` is then free.

The head dim is walked in blocks of BLOCK_D that divide it (the ViL head dims 96/192/384 are 3/6/12 x 32 in half
precision), so they need no padding to powers of two; other head dims get masked blocks.

The products with a matrix state (the output's and dq's with the previous chunk's state, dk's and dv's with the
reverse state after the chunk) contract over the head dim in blocks of STATE_BLOCK (a power of two, BLOCK_D by
default). Where STATE_BLOCK >= HEAD_DIM (one block, masked to the head dim) the weighted token operand of that product
is built once per program instead of once per output block: fewer loads and conversions, for a wider operand and
state tile. On the GPU the sums keep their order (tensor-core dots accumulate K in steps of 16, and the padding adds
zeros); under the interpreter the rounding of the blocks' sums differs.
"""
import inspect
import re
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_kernels import head_offset


# The strides of token tiles decide whether rows load as aligned vectors, so Triton specialises them on their
# divisibility. Sizes and the strides of the gate vectors (read one value per step) do not matter that way and stay
# unspecialised: new sequence lengths, batch sizes or gate layouts do not recompile.
_UNSPECIALISED = re.compile(r'seq_len|num_heads|num_chunks|stride_[ifd][bhn]')


def jit_kernel(fn):
    """``triton.jit`` with the sizes and strides above left unspecialised."""
    names = [name for name in inspect.signature(fn).parameters if _UNSPECIALISED.fullmatch(name)]
    return triton.jit(do_not_specialize=names)(fn)


def head_dim_block(head_dim: int, dtype: torch.dtype, interpreted: bool = False) -> int:
    """Head-dim block: the largest of 32/16 (16 for float32, whose dot operands take twice the registers)
    that divides ``head_dim``, otherwise a masked power of two (16 at least: ``tl.dot``). 64 spills registers in
    the ptxas report of the dk/dv kernel (sm_90, 8 warps, chunk 64).

    The Triton interpreter pays per program and per device-function call, not per element, so there the blocks are
    as large as possible (up to 128): the tests still walk several blocks, partial (masked) ones and whole ones.
    """
    if interpreted:
        return min(128, max(16, triton.next_power_of_2(head_dim)))
    for block in (32, 16) if dtype in (torch.float16, torch.bfloat16) else (16,):
        if head_dim % block == 0:
            return block
    return min(32, max(16, triton.next_power_of_2(head_dim)))


def launch_options(config: dict, kernel: str, shared: Optional[Sequence[str]] = None, **defaults) -> dict:
    """Compile-time parameters and launch options of one kernel of a call: the call's shared ``config``
    (op._config; only its keys in ``shared`` for a kernel that takes fewer), then the kernel's own ``defaults`` (e.g.
    forward.SUMMARY_LAUNCH), then the call's overrides for that kernel (``config['overrides'][kernel]``,
    op.LAUNCH_ENV) on top."""
    options = {key: value for key, value in config.items()
               if key != 'overrides' and (shared is None or key in shared)}
    options.update(defaults)
    options.update(config.get('overrides', {}).get(kernel, {}))
    return options


def state_scan_block(head_dim: int, interpreted: bool = False) -> int:
    """Matrix state elements per program of the scan over chunks (forward.py): 512 on CUDA, 4 float32 (one 16-byte
    vector) per thread of 4 warps, so that a head's DH x DH state spreads over many programs; under the interpreter
    as large as possible (up to 16384: DH 384 still walks several tiles)."""
    if interpreted:
        return min(16384, triton.next_power_of_2(head_dim * head_dim))
    return 512


def token_strides(x: Tensor) -> Tuple[int, int, int]:
    """(batch, head, step) strides of a head-major ``(B, NH, N[, DH])`` tensor, the order the kernels take them in."""
    return x.stride(0), x.stride(1), x.stride(2)


def token_major_strides(x: Tensor) -> Tuple[int, int, int]:
    """(batch, head, step) strides of a token-major ``(B, N, NH[, DH])`` tensor."""
    return x.stride(0), x.stride(2), x.stride(1)


def token_major_buffer(shape: Tuple[int, ...], like: Tensor) -> Tensor:
    """A contiguous ``(B, N, NH)`` or ``(B, N, NH, DH)`` output buffer with the dtype and device of ``like``."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """``acc + a @ b`` on the tensor cores, accumulating in place; DOT_IN_FLOAT32 upcasts the operands first (the
    interpreter multiplies bfloat16 bit patterns as integers)."""
    if DOT_IN_FLOAT32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def one_trip(seq_len):
    """1, as a value the compiler cannot fold (``seq_len`` >= 1, never specialised: ``jit_kernel``): the bound of a
    loop of one iteration around a dot whose result later dots accumulate into. Triton's Hopper layout heuristic gives
    a dot that feeds another dot (a "chained" dot, as in attention) all warps along the rows: at 8 warps and 64 rows
    both warp groups then compute the same tile, twice the accumulator registers, and the accumulator changes layout
    (through shared memory) for the next dot. The heuristic does not look past a loop's region, so in a loop the dot
    splits its columns over the warp groups like the others; same operations, same results."""
    return tl.minimum(seq_len, 1)


@triton.jit
def state_dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """``acc + a @ b`` for building a state: ``a`` a token operand weighted in the accumulation dtype, ``b`` tokens in
    the input dtype (exact). Close to float32 accuracy for half-precision inputs, whose weighted operand rounded to
    half precision would cost digits that the gate gradient's inner products of whole states (backward.py) cannot
    spare: for bfloat16, ``a`` as the sum of two bfloat16 parts (16 of float32's 24 bits; b is exact, the products
    are exact in the float32 accumulator) in two bfloat16 products, half the registers and instructions of 3xTF32
    with float32 operands; for float16 (whose range the second part would leave) 3xTF32. Plain float32 ('ieee') for
    float32 inputs (``DOT_PRECISION``, op._config)."""
    # One return at the end (Triton 3.6 compiles the statements after a return inside an if) and the float64
    # out_dtype spelled out (3.6 does not take it from the accumulator).
    if a.dtype == tl.float64:
        result = tl.dot(a, b.to(tl.float64), acc, out_dtype=tl.float64)
    elif b.dtype == tl.bfloat16:
        high = a.to(tl.bfloat16)
        low = (a - high.to(a.dtype)).to(tl.bfloat16)
        result = dot(low, b, dot(high, b, acc, DOT_PRECISION, DOT_IN_FLOAT32), DOT_PRECISION, DOT_IN_FLOAT32)
    elif DOT_PRECISION == 'ieee':
        result = tl.dot(a, b, acc, input_precision='ieee')
    else:
        result = tl.dot(a, b.to(tl.float32), acc, input_precision='tf32x3')
    return result


@triton.jit
def chunk_steps(chunk, seq_len, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Scan steps of a chunk, which of them exist, and the token each one reads (int64 for the address maths)."""
    steps = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = steps < seq_len
    if REVERSE:
        positions = (seq_len - 1 - steps).to(tl.int64)
    else:
        positions = steps.to(tl.int64)
    return steps, valid, positions


@triton.jit
def load_tokens(ptr, positions, valid, d_start, stride_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(CHUNK, BLOCK_D)`` tile of head-dim block ``d_start``; rows past the end and columns past HEAD_DIM are 0."""
    offs_d = d_start + tl.arange(0, BLOCK_D)
    mask = valid[:, None]
    if HEAD_DIM % BLOCK_D != 0:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptr + positions[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_tokens(ptr, tile, positions, valid, d_start, stride_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = d_start + tl.arange(0, BLOCK_D)
    mask = valid[:, None]
    if HEAD_DIM % BLOCK_D != 0:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptr + positions[:, None] * stride_n + offs_d[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def state_offset(batch_head, chunk, num_chunks, HEAD_DIM: tl.constexpr):
    """Offset of the ``(HEAD_DIM, HEAD_DIM)`` matrix state of one chunk in a ``(B*NH, chunks, DH, DH)`` buffer."""
    return (batch_head.to(tl.int64) * num_chunks + chunk) * HEAD_DIM * HEAD_DIM


@triton.jit
def state_tile_ptrs(ptr, row_start, col_start, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Pointers and mask of the ``(ROWS, COLS)`` tile at (row_start, col_start) of a matrix state."""
    rows = row_start + tl.arange(0, ROWS)
    cols = col_start + tl.arange(0, COLS)
    return ptr + rows[:, None] * HEAD_DIM + cols[None, :], (rows[:, None] < HEAD_DIM) & (cols[None, :] < HEAD_DIM)


@triton.jit
def state_block_ptrs(ptr, row_start, col_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers and mask of the ``(BLOCK_D, BLOCK_D)`` block at (row_start, col_start) of a matrix state."""
    return state_tile_ptrs(ptr, row_start, col_start, HEAD_DIM, BLOCK_D, BLOCK_D)


@triton.jit
def load_state_tile(ptr, row_start, col_start, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    ptrs, mask = state_tile_ptrs(ptr, row_start, col_start, HEAD_DIM, ROWS, COLS)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def load_state_vector(ptr, start, exists, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of a normaliser state; 0 where the state does not exist (before the first, after the last chunk)."""
    offs = start + tl.arange(0, BLOCK_D)
    return tl.load(ptr + offs, mask=(offs < HEAD_DIM) & exists, other=0.0)
