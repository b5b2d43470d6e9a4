"""Chunkwise mLSTM in pure PyTorch: the parallel cell's exact function and autograd gradients in memory linear in N.

Inside a chunk of L steps the quadratic form is used (O(N L) memory). Keys of earlier chunks are summarised in a
DH x DH matrix state and a DH normaliser vector, each carried with its own max stabiliser. The stabiliser of query t
is then the max over the state's stabiliser and the in-chunk log decays, which is exactly the parallel form's row-wise
max of logD over ALL previous keys. That matters because the normaliser max(|q.n|, exp(-m)) and the eps depend on it.
The chunk-to-chunk recurrence is a (chunks x chunks) decay matrix, so there is no Python loop.

Written for the CPU, where every pass over a (chunks, L, DH) tensor costs about as much as a small matmul: inside a
chunk logD[t, s] = F_t + (i_s - F_s) with F the chunk's running sum of log forget gates, so one masked (L, L) matrix
of i_s - F_s gives both the row max and, plus one column, the decays; 1/sqrt(DH) rides in the exponents; the matmuls
run on 3-D ``(batch * heads * chunks, L, DH)`` tensors. Every op has an ONNX form (no cummax): the exporter traces
this backend.

``reverse`` (the cell run from the last step to the first) moves no q, k, v or h data: the steps are chunked from the
sequence's end (padding in front), each chunk keeps its steps in their original order, the in-chunk masks are
anti-causal (upper triangle), F_t sums the forget gates from t to the chunk's end, and the chunk-to-chunk recurrence
runs over the chunks in reverse order. Only per-step gate vectors and (chunks x chunks) matrices are flipped. So in
either direction q, k and v are copied once each, into the chunk layout (not at all if contiguous and a whole number
of chunks; a cast from half precision adds a copy), and h not at all: on the CPU a flip of them costs as much as the
chunk layout copy.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# log-weight of the empty state before the first chunk; finite so that autograd never meets inf - inf (-> NaN grads)
_EMPTY_STATE_LOG_WEIGHT = -1e30


def _chunk_length(n: int, chunk_size: int) -> int:
    """Chunk length for ``n`` steps: at most ``chunk_size``, chosen so that padding is below one step per chunk."""
    num_chunks = math.ceil(n / chunk_size)
    return math.ceil(n / num_chunks)


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


def mlstm_chunkwise(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6,
                    chunk_size: int = 64, reverse: bool = False) -> Tensor:
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

    def chunked(x: Tensor) -> Tensor:
        """``(B, NH, N, ...)`` -> ``(B * NH * chunks, L, ...)``, contiguous."""
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0, *pad_steps) if x.dim() == 4 else pad_steps)
        return x.reshape(groups, length, *x.shape[3:])

    def running_sum(x: Tensor) -> Tensor:
        """Sums of ``x (groups, L)`` from the chunk's first step in the cell's direction up to each step."""
        return x.flip(-1).cumsum(-1).flip(-1) if reverse else x.cumsum(-1)

    q, k, v = chunked(q), chunked(k), chunked(v)
    log_scale = -0.5 * math.log(head_dim)  # the keys' 1/sqrt(DH), applied inside the exponentials
    cum_f = running_sum(chunked(F.logsigmoid(fgate.to(dtype))))  # F_t
    key_log = chunked(igate) - cum_f  # in-chunk logD[t, s] = F_t + key_log[s]
    visible = torch.ones(length, length, dtype=torch.bool, device=q.device)  # [t, s]: step t sees key s
    visible = visible.triu() if reverse else visible.tril()
    causal_key_log = key_log.unsqueeze(-2).masked_fill(~visible, float('-inf'))  # (groups, L, L)
    in_chunk_max = cum_f + causal_key_log.amax(-1)

    # Each chunk's keys summed with their decay to the chunk's last step (in the cell's direction), stabilised by the
    # chunk's own max; that step's F is the chunk's total log forget gate.
    key_max = key_log.amax(-1, keepdim=True)
    weighted_k = k * torch.exp(key_log - key_max + log_scale).unsqueeze(-1)
    chunk_c = weighted_k.transpose(1, 2) @ v
    chunk_n = weighted_k.sum(1)
    chunk_log_f = cum_f[:, 0 if reverse else -1]

    # The state read by chunk j: the summaries of chunks before it in the cell's direction, decayed by the forget
    # gates in between.
    log_w = _state_log_weights(chunk_log_f.view(sequences, num_chunks),
                               (chunk_log_f + key_max[:, 0]).view(sequences, num_chunks), reverse)
    state_max = log_w.amax(-1)
    w = torch.exp(log_w - state_max.unsqueeze(-1))
    # Weights below the smallest normal float add nothing beside the row's largest (1), but as subnormal numbers they
    # make the CPU's matmuls with them many times slower (N=4096, ViL-like gates: 2 % of them, w @ chunk_c ~5x slower,
    # the whole cell 1.2-2x).
    w = w.masked_fill(w < torch.finfo(w.dtype).tiny, 0)
    state_c = (w @ chunk_c.view(sequences, num_chunks, -1)).view(groups, head_dim, head_dim)
    state_n = (w @ chunk_n.view(sequences, num_chunks, head_dim)).view(groups, head_dim, 1)

    state_log_decay = state_max.view(groups, 1) + cum_f
    m = torch.maximum(state_log_decay, in_chunk_max)
    state_scale = torch.exp(state_log_decay - m).unsqueeze(-1)
    scores = (q @ k.transpose(1, 2)) * (causal_key_log + (cum_f - m + log_scale).unsqueeze(-1)).exp_()
    numerator = torch.addcmul(scores @ v, q @ state_c, state_scale)
    row_sum = scores.sum(-1, keepdim=True) + state_scale * (q @ state_n)
    normaliser = torch.maximum(row_sum.abs(), torch.exp(-m).unsqueeze(-1)) + eps
    h = (numerator / normaliser).view(batch, heads, num_chunks * length, head_dim)
    return (h[:, :, pad:] if reverse else h[:, :, :n]).to(out_dtype)
