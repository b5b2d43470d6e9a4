"""Mamba's selective scan in plain PyTorch: exact, chunked, memory linear in the sequence length.

Per channel ``d`` with state ``h`` of size ``N`` (vim_spec.md §4)::

    h_t = exp(delta_t * A_d) * h_{t-1} + delta_t * u_t * B_t
    y_t = <C_t, h_t> + D_d * u_t

The sequence is cut into chunks that are processed one after another, carrying the state. Inside a chunk all
states come from an odd-even reduction of the linear recurrence: O(T) work, O(log T) depth and no loop over
tokens. It only multiplies decays in (0, 1], so it is as accurate as the sequential loop; a closed form through
cumulative sums of log-decays is not (vim_spec.md §7). A hand-written backward pass recomputes each chunk, so
training keeps the chunk-entry states and not the ``(B, D, L, N)`` states of every token.

With ``mamba_ssm`` installed, CUDA tensors go through its fused kernel instead (same signature and math).
"""
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan
except (ImportError, OSError):  # optional CUDA package
    _mamba_selective_scan = None

# A power of two: the odd-even reduction then needs no padding. On an H200, 24 Vim-T mixers (batch 8, 1025 tokens,
# bf16 autocast) trained fastest with 1024 (0.55 s per step; 0.67 s with 512, 1.1 s with 256) at 1.1 GiB peak in
# the forward pass.
DEFAULT_CHUNK_SIZE = 1024


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
        chunk_size: tokens per chunk of the PyTorch path. Its peak memory is about a dozen
            ``(batch, dim, chunk_size, N)`` float32 tensors (backward pass); larger chunks launch fewer kernels.
            Ignored by the CUDA kernel.

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
    y = _ChunkedScan.apply(u.float(), delta, A.float(), B.float().transpose(1, 2), C.float().transpose(1, 2),
                           chunk_size)
    if D is not None:
        y = y + D.float().unsqueeze(-1) * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


class _ChunkedScan(torch.autograd.Function):
    """``y_t = <C_t, h_t>`` for float32 ``u, delta: (b, d, l)``, ``A: (d, n)`` and ``B, C: (b, l, n)``.

    Saves only its inputs and the ``(b, d, n)`` state entering each chunk. The backward pass recomputes a chunk's
    states from there and runs the adjoint recurrence ``g_t = C_t dy_t + decay_{t+1} g_{t+1}`` backwards through
    the chunks, again with :func:`linear_recurrence`.
    """

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
        state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        entry_states, outputs = [], []
        with _float32_only(u):
            for chunk in _chunks(u.shape[-1], chunk_size):
                entry_states.append(state)
                _, states = _chunk_states(state, u[..., chunk], delta[..., chunk], A, B[:, chunk])
                outputs.append(torch.einsum('bdtn,btn->bdt', states, C[:, chunk]))
                state = states[..., -1, :].clone()  # a view would keep the whole chunk alive
        ctx.save_for_backward(u, delta, A, B, C, *entry_states)
        ctx.chunk_size = chunk_size
        return torch.cat(outputs, dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        u, delta, A, B, C, *entry_states = ctx.saved_tensors
        grad_u, grad_delta, grad_B, grad_C = (torch.empty_like(t) for t in (u, delta, B, C))
        grad_A = torch.zeros_like(A)
        carry = torch.zeros_like(entry_states[0])  # decay_{t+1} * g_{t+1} at the start of the following chunk
        chunks = list(_chunks(u.shape[-1], ctx.chunk_size))
        with _float32_only(u):
            for chunk, state in zip(reversed(chunks), reversed(entry_states)):
                u_c, delta_c, grad_y_c = u[..., chunk], delta[..., chunk], grad_y[..., chunk]
                B_c, C_c = B[:, chunk], C[:, chunk]
                decay, states = _chunk_states(state, u_c, delta_c, A, B_c)
                direct = grad_y_c.unsqueeze(-1) * C_c.unsqueeze(1)
                direct = torch.cat([direct[..., :-1, :], direct[..., -1:, :] + carry.unsqueeze(-2)], dim=-2)
                next_decay = torch.cat([decay[..., 1:, :], torch.ones_like(decay[..., :1, :])], dim=-2)
                grad_states = linear_recurrence(next_decay.flip(-2), direct.flip(-2)).flip(-2)
                previous_states = torch.cat([state.unsqueeze(-2), states[..., :-1, :]], dim=-2)
                grad_log_decay = grad_states * previous_states * decay  # d loss / d (delta_t * A)
                grad_delta_u = torch.einsum('bdtn,btn->bdt', grad_states, B_c)  # d loss / d (delta_t * u_t)
                grad_A += torch.einsum('bdtn,bdt->dn', grad_log_decay, delta_c)
                grad_delta[..., chunk] = torch.einsum('bdtn,dn->bdt', grad_log_decay, A) + grad_delta_u * u_c
                grad_u[..., chunk] = grad_delta_u * delta_c
                grad_B[:, chunk] = torch.einsum('bdtn,bdt->btn', grad_states, delta_c * u_c)
                grad_C[:, chunk] = torch.einsum('bdtn,bdt->btn', states, grad_y_c)
                carry = decay[..., 0, :] * grad_states[..., 0, :]
        return grad_u, grad_delta, grad_A, grad_B, grad_C, None


def _float32_only(tensor: Tensor) -> torch.autocast:
    """Keep autocast from running the scan's matrix products in half precision."""
    return torch.autocast(tensor.device.type, enabled=False)


def _chunks(length: int, chunk_size: int) -> Iterator[slice]:
    return (slice(start, start + chunk_size) for start in range(0, length, chunk_size))


def _chunk_states(state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor) -> Tuple[Tensor, Tensor]:
    """Decays and states ``(b, d, t, n)`` of one chunk, starting from the incoming ``(b, d, n)`` state."""
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(-2))
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(1)
    # The incoming state enters as part of the first step's drive: h_0 = a_0 * h_in + b_0.
    first = drive[..., :1, :] + decay[..., :1, :] * state.unsqueeze(-2)
    return decay, linear_recurrence(decay, torch.cat([first, drive[..., 1:, :]], dim=-2))


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
