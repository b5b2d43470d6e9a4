"""Chunkwise mLSTM in pure PyTorch: the parallel cell's exact function and autograd gradients in memory linear in N.

Inside a chunk of L steps the quadratic form is used (O(N L) memory). Keys of earlier chunks are summarised in a
DH x DH matrix state and a DH normaliser vector, each carried with its own max stabiliser. The stabiliser of query t
is then the max over the state's stabiliser and the in-chunk log decays, which is exactly the parallel form's row-wise
max of logD over ALL previous keys. That matters because the normaliser max(|q.n|, exp(-m)) and the eps depend on it.
The chunk-to-chunk recurrence is a (chunks x chunks) decay matrix (no Python loop, so traced graphs hold for any
length), or beyond ``SCAN_MIN_CHUNKS`` chunks a scan over them (a loop whose cost is linear, not quadratic, in the
chunks: at N=4096 in chunks of 64 the matrix costs as many multiply-adds as the rest of the cell).

Written for the CPU, where every pass over a (chunks, L, DH) tensor costs about as much as a small matmul: inside a
chunk logD[t, s] = F_t + (i_s - F_s) with F the chunk's running sum of log forget gates, so the row max is F_t plus a
running max of i_s - F_s, and the decays relative to it are one (L, L) exponential. Its arguments are kept finite and
above the exponential's underflow for every visible key of ordinary gates (hidden ones are set to 0 and masked in
q k^T instead): on the CPU exp of -inf or of a subnormal result runs about 10x slower. 1/sqrt(DH) rides in the
exponents and 1/normaliser in the scores and the queries' state weights, so the two matmuls sum up to h itself.
Without autograd the large intermediates are updated in place. The matmuls run on 3-D ``(batch * heads * chunks, L,
DH)`` tensors. Every op of the traced (loop-free) form has an ONNX form (no cummax): the exporter traces this backend.

``reverse`` (the cell run from the last step to the first) moves no q, k, v or h data: the steps are chunked from the
sequence's end (padding in front), each chunk keeps its steps in their original order, the in-chunk masks are
anti-causal (upper triangle), F_t sums the forget gates from t to the chunk's end, and the chunk-to-chunk recurrence
runs over the chunks in reverse order. Only per-step gate vectors and (chunks x chunks) matrices are flipped. So in
either direction q, k and v are copied once each, into the chunk layout (not at all if contiguous and a whole number
of chunks; a cast from half precision adds a copy), and h not at all: on the CPU a flip of them costs as much as the
chunk layout copy.
"""
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

# log-weight of the empty state before the first chunk; finite so that autograd never meets inf - inf (-> NaN grads)
_EMPTY_STATE_LOG_WEIGHT = -1e30
# From this many chunks per sequence on the states are scanned (CPU, ViL-T heads: the decay matrix is as fast up to
# about 64 chunks and faster with autograd; at 256 chunks it makes the cell 1.3x slower).
SCAN_MIN_CHUNKS = 96
# Default chunk length (CPU, ViL-T heads, 1024 and 4096 steps: 64 beats 32 and 128 in both forms)
CHUNK_SIZE = 64


def _chunk_length(n: int, chunk_size: int) -> int:
    """Chunk length for ``n`` steps: at most ``chunk_size``, chosen so that padding is below one step per chunk."""
    num_chunks = math.ceil(n / chunk_size)
    return math.ceil(n / num_chunks)


def _running_max(x: Tensor, reverse: bool, chunk_size: int) -> Tensor:
    """Max of ``x (groups, L)`` from each chunk's first step in the cell's direction up to each step.

    By log2(chunk_size) shifted maxima, a number that does not depend on L, so a traced graph holds for any length:
    cummax has no ONNX form, and the gradient of maximum is cheap on these small tensors (that of an amax over an
    (L, L) masked copy takes several passes over it)."""
    length, shift = x.shape[-1], 1
    while shift < chunk_size:
        padded = F.pad(x, (0, shift) if reverse else (shift, 0), value=float('-inf'))
        x = torch.maximum(x, padded[..., shift:] if reverse else padded[..., :length])
        shift *= 2
    return x


def _state_log_weights(chunk_log_f: Tensor, chunk_max: Tensor, reverse: bool) -> Tensor:
    """``out[..., j, i]``: log-weight of chunk ``i``'s summary in the state read by chunk ``j`` (``i < j``).

    That is the forget gates of chunks ``i+1 .. j-1`` (segment sums, accurate for long sequences) plus chunk ``i``'s
    own stabiliser; ``_EMPTY_STATE_LOG_WEIGHT`` for ``i >= j``, so chunk 0 reads an empty state. ``reverse``: the
    same over the chunks in reverse order (``i > j``, the last chunk reads the empty state).
    """
    if reverse:
        return _state_log_weights(chunk_log_f.flip(-1), chunk_max.flip(-1), False).flip(-2, -1)
    num_chunks = chunk_log_f.shape[-1]
    before = torch.ones(num_chunks, num_chunks, dtype=torch.bool, device=chunk_log_f.device).tril(-1)
    # column i of row j sums chunk_log_f[i+1 .. j]; the last term is taken off again
    segments = chunk_log_f.unsqueeze(-1).expand(*chunk_log_f.shape, num_chunks).masked_fill(~before, 0).cumsum(-2)
    log_w = segments - chunk_log_f.unsqueeze(-1) + chunk_max.unsqueeze(-2)
    return log_w.masked_fill(~before, _EMPTY_STATE_LOG_WEIGHT)


def _flush_tiny(weights: Tensor) -> Tensor:
    """``weights`` (at most 1) with those below the square root of the smallest normal float set to 0.

    They add nothing beside the largest weight (1), but they and their products with the values they weigh (about 1)
    would be subnormal numbers, which make the CPU's matmuls many times slower (N=4096, ViL-like gates: state weights
    of 1e-30, the decay-matrix product 2x, the whole cell 1.2-2x)."""
    return weights.masked_fill(weights < torch.finfo(weights.dtype).tiny ** 0.5, 0)


def _scan_states(summaries: List[Tensor], decay: Tensor, reverse: bool, track_grad: bool) -> List[Tensor]:
    """The state each chunk reads, for each of ``summaries`` ``(sequences, chunks, DH, ...)``: ``state[j] = decay[j] *
    state[j-1] + summary[j-1]`` with ``j-1`` the chunk before ``j`` in the cell's direction; the first reads zeros.

    Without autograd every step writes into one buffer; with it the steps' states are stacked at the end.
    """
    num_chunks = decay.shape[1]
    order = range(num_chunks - 1, -1, -1) if reverse else range(num_chunks)
    decay = decay.view(*decay.shape, 1, 1)
    if track_grad:  # unbound views: indexing would give each step's gradient the size of all summaries
        states = [[torch.zeros_like(x[:, 0])] for x in summaries]
        for x, chain in zip(summaries, states):
            steps, decays = x.unbind(1), decay.unbind(1)
            for before, j in zip(order, order[1:]):
                chain.append(torch.addcmul(steps[before], chain[-1], decays[j]))
        return [torch.stack(chain[::-1] if reverse else chain, 1) for chain in states]
    states = [torch.empty_like(x) for x in summaries]
    for state in states:
        state[:, order[0]] = 0
    for before, j in zip(order, order[1:]):
        for x, state in zip(summaries, states):
            torch.addcmul(x[:, before], state[:, before], decay[:, j], out=state[:, j])
    return states


def mlstm_chunkwise(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6,
                    chunk_size: int = CHUNK_SIZE, reverse: bool = False) -> Tensor:
    """Chunkwise mLSTM, same arguments and result as :func:`~.parallel.mlstm_parallel`.

    Computes in float32 (float64 for float64 inputs) and returns the dtype of ``q``. Steps are padded to a whole
    number of chunks behind the last step the cell runs (right, or left for ``reverse``); the cell is causal in its
    direction, so padding never reaches the real outputs. ``reverse`` runs from the last step to the first by index
    arithmetic (module docstring).
    """
    batch, heads, n, head_dim = q.shape
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    length = _chunk_length(n, chunk_size)
    pad = -n % length
    num_chunks = (n + pad) // length
    sequences, groups = batch * heads, batch * heads * num_chunks
    pad_steps = (pad, 0) if reverse else (0, pad)
    track_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, igate, fgate))
    # a traced graph (export, compile) must hold for any number of chunks: no loop over them
    scan = not torch.compiler.is_compiling() and num_chunks >= SCAN_MIN_CHUNKS
    last = 0 if reverse else -1  # a chunk's last step, and the last chunk, in the cell's direction

    def chunked(x: Tensor) -> Tensor:
        """``(B, NH, N, ...)`` -> ``(B * NH * chunks, L, ...)``, contiguous."""
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0, *pad_steps) if x.dim() == 4 else pad_steps)
        return x.reshape(groups, length, *x.shape[3:])

    q, k, v = chunked(q), chunked(k), chunked(v)
    if not track_grad:
        from . import chunkwise_inference  # imports this module
        if out_dtype == dtype and chunkwise_inference.supports(q):
            out = q.new_empty(batch, heads, n, head_dim)
            if chunkwise_inference.cell(*(x.view(batch, heads, -1, head_dim) for x in (q, k, v)), igate, fgate, length,
                                        reverse, out, eps):
                return out
    log_scale = -0.5 * math.log(head_dim)  # the keys' 1/sqrt(DH), applied inside the exponentials
    log_f = chunked(F.logsigmoid(fgate.to(dtype)))
    cum_f = log_f.flip(-1).cumsum(-1).flip(-1) if reverse else log_f.cumsum(-1)  # F_t
    key_log = chunked(igate) - cum_f  # in-chunk logD[t, s] = F_t + key_log[s]
    key_running_max = _running_max(key_log, reverse, chunk_size)  # in-chunk max of logD[t, :] minus F_t

    # The stabiliser of the state read by chunk j: the max over the chunks before it of their summaries' log-weights
    # (their keys' max decayed to the chunk's last step, then by the forget gates in between).
    chunk_log_f = cum_f[:, last].view(sequences, num_chunks)  # F of a chunk's last step: its total log forget gate
    chunk_max = chunk_log_f + key_running_max[:, last].view(sequences, num_chunks)
    log_w = _state_log_weights(chunk_log_f, chunk_max, reverse)
    state_max = log_w.amax(-1)

    # Each chunk's keys summed with their decay to the chunk's last step: stabilised by the chunk's own max for the
    # decay matrix, or by the max of the state they are added to for the scan (that of the next chunk; the last
    # chunk's summary is read by none).
    if scan:
        summary_max = torch.cat([state_max[:, 1:], chunk_max[:, -1:]], 1) if not reverse else \
            torch.cat([chunk_max[:, :1], state_max[:, :-1]], 1)
    else:
        summary_max = chunk_max
    key_weight = torch.exp(key_log + (chunk_log_f - summary_max).view(groups, 1) + log_scale)
    weighted_k = k * _flush_tiny(key_weight).unsqueeze(-1)
    chunk_c = (weighted_k.transpose(1, 2) @ v).view(sequences, num_chunks, head_dim, head_dim)
    chunk_n = weighted_k.sum(1).view(sequences, num_chunks, head_dim, 1)
    if scan:
        # the weight of the state before in the state of chunk j: that of chunk j-1 decayed by chunk j-1's forget
        # gates; the first chunk decays nothing (a finite log-weight, so that autograd meets no inf)
        decayed_max = state_max + chunk_log_f
        decayed_max = torch.cat([decayed_max[:, 1:], state_max[:, -1:]], 1) if reverse else \
            torch.cat([state_max[:, :1], decayed_max[:, :-1]], 1)
        decay = _flush_tiny(torch.exp(decayed_max - state_max))
        state_c, state_n = _scan_states([chunk_c, chunk_n], decay, reverse, track_grad)
    else:
        w = _flush_tiny(torch.exp(log_w - state_max.unsqueeze(-1)))
        state_c = w @ chunk_c.view(sequences, num_chunks, -1)
        state_n = w @ chunk_n.view(sequences, num_chunks, -1)
    state_c = state_c.view(groups, head_dim, head_dim)
    state_n = state_n.view(groups, head_dim, 1)

    # m_t = F_t + stabiliser; stabiliser = max(the state's, the in-chunk keys')
    stabiliser = torch.maximum(key_running_max, state_max.view(groups, 1))
    state_scale = _flush_tiny(torch.exp(state_max.view(groups, 1) - stabiliser))
    visible = torch.ones(length, length, dtype=dtype, device=q.device)  # [t, s]: step t sees key s
    visible = visible.triu() if reverse else visible.tril()
    log_decay = key_log.unsqueeze(-2) - (stabiliser - log_scale).unsqueeze(-1)  # <= log_scale where visible
    qk = q @ k.transpose(1, 2)
    qk = qk.triu_() if reverse else qk.tril_()
    if track_grad:
        scores = qk * (log_decay * visible).exp()
    else:
        scores = qk.mul_(log_decay.mul_(visible).exp_())

    row_sum = scores.sum(-1) + state_scale * (q @ state_n).squeeze(-1)
    normaliser = torch.maximum(row_sum.abs(), torch.exp(-(stabiliser + cum_f))) + eps
    inverse = normaliser.reciprocal()
    scores = scores * inverse.unsqueeze(-1) if track_grad else scores.mul_(inverse.unsqueeze(-1))
    h = (scores @ v).baddbmm_(q * (state_scale * inverse).unsqueeze(-1), state_c)
    h = h.view(batch, heads, num_chunks * length, head_dim)
    return (h[:, :, pad:] if reverse else h[:, :, :n]).to(out_dtype)
