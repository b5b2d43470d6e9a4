"""The chunkwise mLSTM without autograd on the CPU: the same function as :mod:`.chunkwise` in fewer passes over memory.

On one CPU core the chunkwise cell's elementwise passes over its ``(chunks, L, L)`` and ``(chunks, L, DH)``
intermediates cost about as much as its matmuls. Without autograd most of them can go, because the in-chunk decay
factorises. With ``key_log[s] = i_s - F_s`` (:mod:`.chunkwise`) and ``stab_t`` the stabiliser of query ``t``, a score
is ``q_t.k_s exp(key_log[s] - stab_t) / sqrt(DH)``. Taken relative to one reference ``ref_j`` per chunk instead of
``stab_t`` per query, it is ``r_t (q_t . wk_s)``, with ``wk_s = k_s exp(key_log[s] - ref_j) / sqrt(DH)`` (the keys
weighted once, for the chunk's state summary too) and ``r_t = exp(ref_j - stab_t)`` a factor per query row. The
state the chunk reads is taken relative to ``ref_j`` as well, so it carries the same row factor, and so does the
normaliser's row sum: the matmuls sum up to ``r_t`` times

    X_t = [q_t . wk_s]_{s visible} @ v + q_t @ C_j,    x_t = sum_s [q_t . wk_s]_{s visible} + q_t . n_j

and ``h_t = X_t / (max(|x_t|, exp(-m_t) / r_t) + eps / r_t)``: one pass over X writes h (into any layout, e.g. the
token-major one of the mixer's output norm). Per chunk that leaves one weighting of the keys, the causal mask, a row
sum of the scores and five matmuls (``wk^T v``, ``k`` summed with the key weights, the states, ``q [wk; n]^T`` with
``q . n`` as the scores' last column, ``scores v + q C``), against about ten elementwise passes more in the general
form.

``ref_j`` is the chunk's key max, lowered where that would put the first query's row (the smallest ``stab_t``) below
``e^-row_range``, and raised to the state's max minus ``state_lead`` where the decayed state outweighs the chunk's keys
by more (their scores, at most ``e^-state_lead`` of the state's terms, are then scaled down with it). So every row's
largest term in X lies between ``e^-row_range`` and ``e^max(key_lead, state_lead)``, and the weights that
:func:`.chunkwise._flush_tiny` zeroes are negligible beside it. Where a chunk's keys span more than ``row_range +
key_lead`` (its key weights would exceed ``e^key_lead``), or from ``SCAN_MIN_CHUNKS`` chunks on, the call returns
``False`` and :func:`.chunkwise.mlstm_chunkwise` runs its general form: the same function either way.

Where the C++ kernels run with BLAS (:mod:`..cpu_kernels`), the cell is their op ``cell_``: the same form chunk by
chunk in the cell's direction, the state carried by its recurrence (``S_j = decay_j S_{j-1} + weight_j C_{j-1}``,
linear in the chunks, so no ``SCAN_MIN_CHUNKS`` limit) instead of the decay matrix's product, and the scores computed
only in their blocks of ``SCORE_BLOCK_ROWS`` rows that hold visible keys. No chunk's state, summary or scores is
stored: each chunk's products run on data in cache; the mixer's gated output is its epilogue
(:func:`cell_gated_output_`). Elsewhere the mixer's output norm applies the rows' factors as it reads X
(:func:`cell_unscaled`).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import cpu_kernels
from .chunkwise import SCAN_MIN_CHUNKS, _chunk_length, _flush_tiny, _state_log_weights

# Per dtype, natural-log ranges (row_range, key_lead, state_lead). _flush_tiny zeroes weights below sqrt(tiny): e^-43.7
# in float32, so a row whose largest term is e^-20 loses at most e^-23.7 = 5e-11 of it (e^-54 in float64 at e^-300).
# A state weight is a summary's weight over its keys' excess (at most e^key_lead): e^-43.7 / e^40 is still a normal
# float32. States and rows stay below e^40 (float32) or e^300 (float64) times their summands.
_RANGES = {torch.float32: (20.0, 40.0, 20.0), torch.float64: (300.0, 300.0, 300.0)}
_LOG_FLUSH = {dtype: 0.5 * math.log(torch.finfo(dtype).tiny) for dtype in _RANGES}
# The C++ cell's chunk length (ViL-T, 1 thread, 1024 tokens: the model 3% faster than in chunks of 64, as fast as in
# chunks of 16) and rows per block of its score products (in longer chunks the diagonal blocks' upper halves are not
# computed).
COMPILED_CHUNK_SIZE = 32
SCORE_BLOCK_ROWS = 32


def supports(q: Tensor, *others: Tensor) -> bool:
    """Whether :func:`cell` may run for cell inputs ``q`` and ``others``: float32/64 on the CPU, no autograd record,
    not traced."""
    return (q.device.type == 'cpu' and q.dtype in _RANGES
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, *others)))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def chunk_steps(n: int, chunk_size: int) -> Tuple[int, int]:
    """``(L, pad)``: the chunk length for ``n`` steps (as :mod:`.chunkwise` chooses it) and the padded steps."""
    length = _chunk_length(n, chunk_size)
    return length, -n % length


class Layout:
    """The padded buffer :func:`cell` reads, for producers that write q, k and v straight into it.

    ``qkv (3, B, NH, steps, DH)`` holds q, k and v of ``steps``, a whole number of chunks of at most ``chunk_size``
    (padding behind the last step, or in front of the first for ``reverse``, zero); ``real`` is the view of the
    ``n`` real steps.
    """

    def __init__(self, batch: int, heads: int, n: int, head_dim: int, chunk_size: int, reverse: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.length, self.pad = chunk_steps(n, chunk_size)
        steps = n + self.pad
        self.qkv = torch.empty(3, batch, heads, steps, head_dim, dtype=dtype, device=device)
        if self.pad:
            self.qkv[:, :, :, slice(0, self.pad) if reverse else slice(n, steps)] = 0
        self.real = self.qkv[:, :, :, slice(self.pad, steps) if reverse else slice(0, n)]


def cell(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, length: int, reverse: bool, out: Tensor,
         eps: float = 1e-6) -> bool:
    """The cell of ``(B, NH, steps, DH)`` contiguous ``q``, ``k``, ``v`` padded to whole chunks of ``length`` steps
    (:class:`Layout`), gate pre-activations ``(B, NH, n)``, written into ``out (B, NH, n, DH)`` (any strides).
    Returns ``False`` (``out`` untouched) where the general cell must run: rows whose range needs it (module
    docstring), or from ``SCAN_MIN_CHUNKS`` chunks on where the C++ cell does not run (the decay matrix's cost grows
    with their square; the C++ cell's recurrence does not)."""
    if _compiled_cell_usable(q, k, v, out):
        return _compiled_cell(q, k, v, igate, fgate, length, reverse, out, eps)
    unscaled = cell_unscaled(q, k, v, igate, fgate, length, reverse, eps)
    if unscaled is None:
        return False
    torch.mul(*unscaled, out=out)
    return True


def cell_gated_output_(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, length: int, reverse: bool,
                       x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], skip: Tensor,
                       norm_eps: float, z_bias: Optional[Tensor] = None, eps: float = 1e-6) -> bool:
    """The C++ cell with the mixer's gated output (:func:`..mixer_ops.gated_output_` of ``x_conv``, ``z (B, n, NH *
    DH)`` with :func:`..cpu_kernels.rows_strided` rows) as its epilogue: each head's rows of h give its channels of
    ``z`` while in cache, h is not stored. Returns ``False`` (``z`` untouched) where the C++ cell does not run or
    :func:`cell` would return it."""
    if not (cpu_kernels.rows_strided(z)
            and _compiled_cell_usable(q, k, v, x_conv, z, norm_weight, norm_bias, skip, z_bias)):
        return False
    igate, log_f = _gate_inputs(q, igate, fgate)
    return cpu_kernels.ops().cell_gated_output_(q, k, v, igate, log_f, length, SCORE_BLOCK_ROWS, reverse, eps,
                                                *_RANGES[q.dtype], _LOG_FLUSH[q.dtype], x_conv.contiguous(), z,
                                                z_bias, norm_weight, norm_bias, skip, norm_eps)


def chunk_size(x: Tensor, default: int) -> int:
    """The chunk size of a :class:`Layout` for activations like ``x``: ``COMPILED_CHUNK_SIZE`` where the C++ cell
    runs, else ``default`` (the PyTorch form's)."""
    return COMPILED_CHUNK_SIZE if _compiled_cell_usable(x) else default


def _compiled_cell_usable(*tensors: Optional[Tensor]) -> bool:
    return cpu_kernels.usable(*tensors) and cpu_kernels.ops().blas_found()


def _gate_inputs(q: Tensor, igate: Tensor, fgate: Tensor) -> Tuple[Tensor, Tensor]:
    """The C++ cell's gate inputs: ``igate`` and log sigmoid of ``fgate`` in q's dtype, contiguous along the steps."""
    igate = igate.to(q.dtype)
    return igate if igate.stride(-1) == 1 else igate.contiguous(), F.logsigmoid(fgate.to(q.dtype))


def _compiled_cell(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, length: int, reverse: bool,
                   out: Tensor, eps: float) -> bool:
    """:func:`cell` as the C++ kernels' op (check :func:`_compiled_cell_usable` first)."""
    return cpu_kernels.ops().cell_(q, k, v, *_gate_inputs(q, igate, fgate), length, SCORE_BLOCK_ROWS, reverse, eps,
                                   *_RANGES[q.dtype], _LOG_FLUSH[q.dtype], out)


def cell_unscaled(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, length: int, reverse: bool,
                  eps: float = 1e-6) -> Optional[Tuple[Tensor, Tensor]]:
    """The PyTorch form of :func:`cell` as ``(X, factor)``: ``h = X * factor`` with ``X (B, NH, n, DH)`` and ``factor
    (B, NH, n, 1)`` views of the cell's buffers (for a consumer that scales the rows as it reads them); ``None`` where
    the general cell must run."""
    batch, heads, steps, head_dim = q.shape
    n = igate.shape[-1]
    pad = steps - n
    sequences, num_chunks = batch * heads, steps // length
    if num_chunks >= SCAN_MIN_CHUNKS:
        return None
    groups = sequences * num_chunks
    row_range, key_lead, state_lead = _RANGES[q.dtype]
    first, last = (-1, 0) if reverse else (0, -1)  # a chunk's first and last step in the cell's direction

    def padded(gate: Tensor, value: float) -> Tensor:
        gate = gate.to(q.dtype)
        gate = F.pad(gate, (pad, 0) if reverse else (0, pad), value=value) if pad else gate
        return gate.reshape(groups, length)

    log_f = F.logsigmoid(padded(fgate, 0.0))
    cum_f = log_f.flip(-1).cumsum(-1).flip(-1) if reverse else log_f.cumsum(-1)  # F_t
    key_log = padded(igate, float('-inf')) - cum_f  # padded keys weigh nothing
    # one op, where _running_max takes 3 log2(L) (its shifted maxima have an ONNX form; this eager cell needs none)
    key_running_max = key_log.flip(-1).cummax(-1).values.flip(-1) if reverse else key_log.cummax(-1).values
    key_max = key_running_max[:, last]
    # the keys' reference: their max, or less where that would take the first query's row below e^-row_range
    key_ref = torch.minimum(key_max, key_log[:, first] + row_range)
    key_excess = key_max - key_ref  # the keys' weights reach e^key_excess
    if bool(key_excess.amax() > key_lead):
        return None
    chunk_log_f = cum_f[:, last].view(sequences, num_chunks)
    log_w = _state_log_weights(chunk_log_f, chunk_log_f + key_max.view(sequences, num_chunks), reverse)
    state_max = log_w.amax(-1)
    ref = torch.maximum(key_ref.view(sequences, num_chunks), state_max - state_lead)
    stabiliser = torch.maximum(key_running_max, state_max.view(groups, 1))
    lag = stabiliser - ref.view(groups, 1)  # -log r_t, in [-row_range, max(key_lead, state_lead)]

    q, k, v = (x.view(groups, length, head_dim) for x in (q, k, v))
    log_scale = -0.5 * math.log(head_dim)
    key_weight = _flush_tiny(torch.exp(key_log - (key_ref - log_scale).unsqueeze(-1)))
    # the weighted keys, and below them each chunk's state normaliser: q times it is q . n in the scores' last column
    keys_and_n = q.new_empty(groups, length + 1, head_dim)
    weighted_k = torch.mul(k, key_weight.unsqueeze(-1), out=keys_and_n[:, :length])
    summary_n = torch.bmm(key_weight.unsqueeze(1), k)  # n of each chunk, (groups, 1, DH)
    summaries = torch.bmm(weighted_k.transpose(1, 2), v)  # C of each chunk
    # a summary's weight in a state relative to ref, its keys' weights taken back to their max; flushed where that
    # weight is below _flush_tiny's threshold (the product's size, so no subnormal weight times a large summary)
    log_w = log_w - ref.unsqueeze(-1)
    state_weights = torch.exp(log_w - key_excess.view(sequences, 1, num_chunks))
    state_weights.masked_fill_(log_w < _LOG_FLUSH[q.dtype], 0)
    n_states = keys_and_n[:, length].view(sequences, num_chunks, head_dim)
    states = torch.bmm(state_weights, summaries.view(sequences, num_chunks, -1)).view_as(summaries)
    torch.bmm(state_weights, summary_n.view(sequences, num_chunks, head_dim), out=n_states)

    scores_and_qn = torch.bmm(q, keys_and_n.transpose(1, 2))
    scores = scores_and_qn[..., :length]
    chunk_scale = key_ref - ref.view(groups)  # 0 unless the state outweighs the chunk's keys by the state lead
    scores.triu_() if reverse else scores.tril_()
    if bool(chunk_scale.amin() < 0):
        scores.mul_(torch.exp(chunk_scale).view(groups, 1, 1))
    row_sum = scores_and_qn.sum(-1)
    mixed = torch.bmm(scores, v).baddbmm_(q, states)  # X: (groups, L, DH)

    floor = torch.exp(-(cum_f + ref.view(groups, 1)))  # exp(-m_t) / r_t
    denominator = torch.maximum(row_sum.abs_(), floor).add_(torch.exp(lag).mul_(eps))
    real = slice(pad, steps) if reverse else slice(0, n)
    factor = denominator.reciprocal_().view(batch, heads, steps, 1)[:, :, real]
    return mixed.view(batch, heads, steps, head_dim)[:, :, real], factor
