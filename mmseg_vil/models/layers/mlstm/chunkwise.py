"""Chunkwise mLSTM in pure PyTorch: the parallel cell's exact function and autograd gradients in memory linear in N.

Inside a chunk of L steps the quadratic form is used (O(N L) memory). Keys of earlier chunks are summarised in a
DH x DH matrix state and a DH normaliser vector, each carried with its own max stabiliser. The stabiliser of query t
is then the max over the state's stabiliser and the in-chunk log decays, which is exactly the parallel form's row-wise
max of logD over ALL previous keys. That matters because the normaliser max(|q.n|, exp(-m)) and the eps depend on it.
The chunk-to-chunk recurrence is a (chunks x chunks) decay matrix, so there is no Python loop.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# log-weight of the empty state before the first chunk; finite so that autograd never meets inf - inf (-> NaN grads)
_EMPTY_STATE_LOG_WEIGHT = -1e30


def _segment_log_decays(log_f: Tensor) -> Tensor:
    """``out[..., t, s] = log_f[s+1] + ... + log_f[t]`` for s <= t, -inf for s > t.

    Summing every segment directly, instead of differencing one long cumsum, keeps long sequences accurate.
    """
    n = log_f.shape[-1]
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=log_f.device).tril(-1)
    sums = log_f.unsqueeze(-1).expand(*log_f.shape, n).masked_fill(~strictly_lower, 0).cumsum(-2)
    return sums.masked_fill(~torch.ones_like(strictly_lower).tril(), float('-inf'))


def _chunk_length(n: int, chunk_size: int) -> int:
    """Chunk length for ``n`` steps: at most ``chunk_size``, chosen so that padding is below one step per chunk."""
    num_chunks = math.ceil(n / chunk_size)
    return math.ceil(n / num_chunks)


def mlstm_chunkwise(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6,
                    chunk_size: int = 64, reverse: bool = False) -> Tensor:
    """Chunkwise mLSTM, same arguments and result as :func:`~.parallel.mlstm_parallel`.

    Computes in float32 (float64 for float64 inputs) and returns the dtype of ``q``. Steps are right-padded to a whole
    number of chunks; the cell is causal, so padding never reaches the real outputs. ``reverse`` runs from the last
    step to the first: the inputs are flipped inside the padding copy, the output on its way out.
    """
    batch, heads, n, head_dim = q.shape
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    length = _chunk_length(n, chunk_size)
    pad = -n % length
    num_chunks = (n + pad) // length

    def chunked(x: Tensor) -> Tensor:
        if reverse:
            x = x.flip(2)
        x = F.pad(x.to(dtype), (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(batch, heads, num_chunks, length, *x.shape[3:])

    q, v = chunked(q), chunked(v)
    k = chunked(k) / math.sqrt(head_dim)
    log_i = chunked(igate)
    log_f = chunked(F.logsigmoid(fgate.to(dtype)))

    log_d = _segment_log_decays(log_f) + log_i.unsqueeze(-2)  # (B, NH, C, L, L): in-chunk logD[t, s]

    # Each chunk's keys summed with their decay to the chunk end, stabilised by the chunk's own max.
    key_to_end = log_d[..., -1, :]
    chunk_max = key_to_end.amax(-1)
    weighted_k = k * torch.exp(key_to_end - chunk_max.unsqueeze(-1)).unsqueeze(-1)
    chunk_c = weighted_k.transpose(-2, -1) @ v
    chunk_n = weighted_k.sum(-2)

    # State after chunk j = sum over chunks i <= j, decayed by the forget gates of chunks i+1..j; re-stabilised.
    log_w = _segment_log_decays(log_f.sum(-1)) + chunk_max.unsqueeze(-2)
    state_max = log_w.amax(-1)
    w = torch.exp(log_w - state_max.unsqueeze(-1))
    state_c = torch.einsum('bhij,bhjde->bhide', w, chunk_c)
    state_n = w @ chunk_n
    # Chunk j reads the state after chunk j-1.
    state_c = F.pad(state_c[:, :, :-1], (0, 0, 0, 0, 1, 0))
    state_n = F.pad(state_n[:, :, :-1], (0, 0, 1, 0))
    state_max = F.pad(state_max[:, :, :-1], (1, 0), value=_EMPTY_STATE_LOG_WEIGHT)

    state_log_decay = state_max.unsqueeze(-1) + log_f.cumsum(-1)  # (B, NH, C, L)
    m = torch.maximum(state_log_decay, log_d.amax(-1))
    state_scale = torch.exp(state_log_decay - m).unsqueeze(-1)
    scores = (q @ k.transpose(-2, -1)) * torch.exp(log_d - m.unsqueeze(-1))
    numerator = scores @ v + state_scale * (q @ state_c)
    row_sum = scores.sum(-1) + state_scale.squeeze(-1) * (q * state_n.unsqueeze(-2)).sum(-1)
    normaliser = torch.maximum(row_sum.abs(), torch.exp(-m)) + eps
    h = (numerator / normaliser.unsqueeze(-1)).reshape(batch, heads, num_chunks * length, head_dim)[:, :, :n]
    return (h.flip(2) if reverse else h).to(out_dtype)
