"""Mamba's selective scan in plain PyTorch: exact, chunked, memory linear in the sequence length.

Per channel ``d`` with state ``h`` of size ``N`` (vim_spec.md §4)::

    h_t = exp(delta_t * A_d) * h_{t-1} + delta_t * u_t * B_t
    y_t = <C_t, h_t> + D_d * u_t

The sequence is cut into chunks that are processed one after another, carrying the state. Inside a chunk all
states come from an odd-even reduction of the linear recurrence: O(T) work, O(log T) depth and no loop over
tokens. It only multiplies decays in (0, 1], so it is as accurate as the sequential loop; a closed form through
cumulative sums of log-decays is not (vim_spec.md §7). With gradients each chunk is checkpointed, so autograd
keeps the chunk-boundary states and not the ``(B, D, L, N)`` tensors of every chunk.

With ``mamba_ssm`` installed, CUDA tensors go through its fused kernel instead (same signature and math).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan
except (ImportError, OSError):  # optional CUDA package
    _mamba_selective_scan = None

DEFAULT_CHUNK_SIZE = 256


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Selective scan with the interface of ``mamba_ssm``'s ``selective_scan_fn``.

    Args:
        u: ``(batch, dim, length)`` input.
        delta: ``(batch, dim, length)`` step sizes before ``delta_bias`` and softplus.
        A: ``(dim, N)`` state matrix (negative for a stable scan).
        B: ``(batch, N, length)`` input projection, shared by all channels.
        C: ``(batch, N, length)`` output projection, shared by all channels.
        D: optional ``(dim,)`` skip weight.
        z: optional ``(batch, dim, length)`` gate; the output is multiplied by ``silu(z)``.
        delta_bias: optional ``(dim,)`` added to ``delta`` in float32.
        delta_softplus: apply softplus (threshold 20, like the CUDA kernel) to the biased ``delta``.
        chunk_size: tokens per chunk of the PyTorch path; bounds its peak memory at about six
            ``(batch, dim, chunk_size, N)`` float32 tensors. Ignored by the CUDA kernel.

    Returns:
        ``(batch, dim, length)`` in the dtype of ``u``; everything inside is computed in float32.
    """
    if _mamba_selective_scan is not None and u.is_cuda:
        return _mamba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be a positive number of tokens, got {chunk_size}')
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float().unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    y = _chunked_scan(u.float(), delta, A.float(), B.float().transpose(1, 2), C.float().transpose(1, 2), chunk_size)
    if D is not None:
        y = y + D.float().unsqueeze(-1) * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def _chunked_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
    """``y_t = <C_t, h_t>`` for ``u, delta: (b, d, l)``, ``A: (d, n)`` and ``B, C: (b, l, n)``."""
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    outputs = []
    for start in range(0, u.shape[-1], chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (state, u[..., chunk], delta[..., chunk], A, B[:, chunk], C[:, chunk])
        if needs_grad:
            y, state = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, state = _scan_chunk(*args)
        outputs.append(y)
    return torch.cat(outputs, dim=-1)


def _scan_chunk(state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
    """One chunk from the incoming ``(b, d, n)`` state; returns its outputs ``(b, d, t)`` and its last state."""
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(-2))  # (b, d, t, n)
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(1)  # (b, d, t, n)
    # The incoming state enters as part of the first step's drive: h_0 = a_0 * h_in + b_0.
    first = drive[..., :1, :] + decay[..., :1, :] * state.unsqueeze(-2)
    states = linear_recurrence(decay, torch.cat([first, drive[..., 1:, :]], dim=-2))
    y = torch.einsum('bdtn,btn->bdt', states, C)
    return y, states[..., -1, :]


def linear_recurrence(decay: Tensor, drive: Tensor) -> Tensor:
    """All states of ``h_t = decay_t * h_{t-1} + drive_t`` (``h_{-1} = 0``) along dim -2, without a token loop.

    Odd-even reduction: every pair of steps merges into one step (decay ``a1 * a0``, drive ``a1 * b0 + b1``), the
    half-length recurrence gives the states at odd positions, and each even state follows from its odd
    predecessor in one step.
    """
    length = drive.shape[-2]
    if length == 1:
        return drive
    if length % 2:  # a neutral step (decay 1, drive 0) makes the length even
        decay = F.pad(decay, (0, 0, 0, 1), value=1.0)
        drive = F.pad(drive, (0, 0, 0, 1))
    decay_even, decay_odd = decay[..., 0::2, :], decay[..., 1::2, :]
    drive_even, drive_odd = drive[..., 0::2, :], drive[..., 1::2, :]
    states_odd = linear_recurrence(decay_odd * decay_even, decay_odd * drive_even + drive_odd)
    states_even = torch.cat(
        [drive_even[..., :1, :], decay_even[..., 1:, :] * states_odd[..., :-1, :] + drive_even[..., 1:, :]], dim=-2)
    states = torch.stack([states_even, states_odd], dim=-2).flatten(-3, -2)
    return states[..., :length, :]
