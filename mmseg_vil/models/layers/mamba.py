"""The bidirectional Mamba mixer of Vision Mamba (``bimamba_type="v2"``, vim_spec.md §2.5).

One input projection feeds two selective state-space branches, one reading the tokens forwards and one reading
them backwards; their gated outputs are averaged and projected back to the embedding width.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .selective_scan import DEFAULT_CHUNK_SIZE, selective_scan


class SelectiveSSM(nn.Module):
    """One scan direction: causal depthwise conv, input-dependent (delta, B, C), selective scan, skip and gate.

    Args:
        inner_dims: channels of the branch (``expand * embed_dims``).
        d_state: state size ``N`` per channel.
        d_conv: kernel size of the causal depthwise convolution.
        dt_rank: rank of the low-rank projection that produces the step sizes.
        dt_min: smallest initial step size.
        dt_max: largest initial step size.
        scan_chunk_size: tokens per chunk of the PyTorch selective scan.
    """

    def __init__(self, inner_dims: int, d_state: int, d_conv: int, dt_rank: int, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, scan_chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.scan_chunk_size = scan_chunk_size
        self.conv1d = nn.Conv1d(inner_dims, inner_dims, d_conv, groups=inner_dims, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner_dims, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner_dims)
        self.A_log = nn.Parameter(torch.empty(inner_dims, d_state))
        self.D = nn.Parameter(torch.empty(inner_dims))
        self._init_ssm_parameters(dt_min, dt_max)

    @torch.no_grad()
    def _init_ssm_parameters(self, dt_min: float, dt_max: float) -> None:
        """Mamba's init: S4D-real ``A = -(1..N)``, unit skip, and step sizes log-uniform in ``[dt_min, dt_max]``.

        The official Vim code zeroes the backward branch's ``dt_proj.bias`` by accident (vim_spec.md §3); both
        branches get the intended init here.
        """
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj.bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Scan ``x`` (batch, channels, length) in token order; ``z`` (same shape) is the gate."""
        length = x.shape[-1]
        u = F.silu(self.conv1d(x)[..., :length])
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        return selective_scan(
            u, delta, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, chunk_size=self.scan_chunk_size)


class BidirectionalMamba(nn.Module):
    """Vim's "v2" mixer: shared in/out projections and gate, a forward and a backward :class:`SelectiveSSM`.

    Args:
        embed_dims: token width.
        d_state: state size ``N`` per channel.
        d_conv: kernel size of the causal depthwise convolutions.
        expand: ratio of the inner width to ``embed_dims``.
        dt_rank: rank of the step-size projection; ``None`` means ``ceil(embed_dims / 16)`` as in Mamba.
        scan_chunk_size: tokens per chunk of the PyTorch selective scan.
    """

    def __init__(self, embed_dims: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, scan_chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        inner_dims = expand * embed_dims
        dt_rank = math.ceil(embed_dims / 16) if dt_rank is None else dt_rank
        self.in_proj = nn.Linear(embed_dims, 2 * inner_dims, bias=False)
        self.forward_branch = SelectiveSSM(inner_dims, d_state, d_conv, dt_rank, scan_chunk_size=scan_chunk_size)
        self.backward_branch = SelectiveSSM(inner_dims, d_state, d_conv, dt_rank, scan_chunk_size=scan_chunk_size)
        self.out_proj = nn.Linear(inner_dims, embed_dims, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Mix ``x`` (batch, length, embed_dims) along the token axis in both directions."""
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        y_forward = self.forward_branch(x, z)
        y_backward = self.backward_branch(x.flip(-1), z.flip(-1)).flip(-1)
        return self.out_proj(((y_forward + y_backward) / 2).transpose(1, 2))
