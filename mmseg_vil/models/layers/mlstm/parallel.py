"""The official quadratic ("parallel, stabilised") mLSTM cell of Vision-LSTM: the numerical reference.

Same operations as ``parallel_stabilized_simple`` of the official code (vil_spec.md §2.6); O(N^2) memory per head.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mlstm_parallel(q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor, eps: float = 1e-6) -> Tensor:
    """Quadratic mLSTM.

    Args:
        q, k, v: ``(B, NH, N, DH)`` queries, keys, values.
        igate, fgate: ``(B, NH, N)`` input- and forget-gate pre-activations.
        eps: added to the normaliser before dividing.

    Returns:
        ``(B, NH, N, DH)`` hidden states, in the dtype of ``q``.
    """
    n = q.shape[-2]
    gate_dtype = torch.promote_types(q.dtype, torch.float32)  # gates at least in float32, float64 stays float64
    log_f = F.logsigmoid(fgate.to(gate_dtype))
    cum = torch.cumsum(log_f, dim=-1)
    # logD[t, s] = F_t - F_s + i_s for s <= t (forget gate of step s is not applied to input s).
    log_d = cum.unsqueeze(-1) - cum.unsqueeze(-2) + igate.to(gate_dtype).unsqueeze(-2)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float('-inf'))
    max_log_d = log_d.amax(dim=-1, keepdim=True)
    decay = torch.exp(log_d - max_log_d)
    scores = (q @ (k / math.sqrt(q.shape[-1])).transpose(-2, -1)) * decay.to(q.dtype)
    normaliser = torch.maximum(scores.sum(dim=-1, keepdim=True).abs().to(gate_dtype), torch.exp(-max_log_d))
    return ((scores / (normaliser + eps).to(q.dtype)) @ v).to(q.dtype)
