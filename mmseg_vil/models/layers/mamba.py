"""The Mamba token mixers of Vision Mamba (vim_spec.md §2.5): ``bimamba_type`` ``"v2"`` (the released models),
``"v1"`` and ``"none"``.

One input projection feeds selective state-space scans: "v2" has a forward and a backward branch with their own
parameters, "v1" scans the same convolved sequence backwards with its own state matrix only, "none" is Mamba's
single forward scan. The gated outputs are combined and projected back to the embedding width.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .selective_scan import DEFAULT_CHUNK_SIZE, selective_scan

BIMAMBA_TYPES = ('v2', 'v1', 'none')


def s4d_real_a_log(inner_dims: int, d_state: int) -> Tensor:
    """Mamba's S4D-real init of ``A_log``: ``log(1..N)`` in every row, so ``A = -(1..N)``."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner_dims, 1)


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
        self.A_log.copy_(s4d_real_a_log(*self.A_log.shape))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj.bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Causal conv + SiLU of ``x`` (batch, channels, length) and its step sizes, ``B`` and ``C``."""
        length = x.shape[-1]
        u = F.silu(self.conv1d(x)[..., :length])
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        return u, delta, B.transpose(1, 2), C.transpose(1, 2)

    def scan(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor, A_log: Optional[Tensor] = None) -> Tensor:
        """Selective scan of projected inputs in token order, gated by ``z``; ``A_log`` defaults to the branch's."""
        A_log = self.A_log if A_log is None else A_log
        return selective_scan(
            u, delta, -torch.exp(A_log.float()), B, C, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, chunk_size=self.scan_chunk_size)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Scan ``x`` (batch, channels, length) in token order; ``z`` (same shape) is the gate."""
        return self.scan(*self.project(x), z)


class BidirectionalMamba(nn.Module):
    """Vim's mixer: shared in/out projections and gate around one or two :class:`SelectiveSSM` scans.

    Args:
        embed_dims: token width.
        d_state: state size ``N`` per channel.
        d_conv: kernel size of the causal depthwise convolutions.
        expand: ratio of the inner width to ``embed_dims``.
        dt_rank: rank of the step-size projection; ``None`` means ``ceil(embed_dims / 16)`` as in Mamba.
        bimamba_type: ``'v2'`` (forward and backward branches, each with its own conv, projections, ``A``, ``D``),
            ``'v1'`` (the forward branch's convolved sequence also scanned backwards with a second ``A``, outputs
            summed) or ``'none'`` (forward scan only).
        divide_out: ``'v2'`` averages the two directions (official ``if_divide_out``) instead of summing them.
        layer_scale: initial value of a learnable per-channel output scale (official ``init_layer_scale``); None
            for none.
        scan_chunk_size: tokens per chunk of the PyTorch selective scan.
    """

    def __init__(self, embed_dims: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, bimamba_type: str = 'v2', divide_out: bool = True,
                 layer_scale: Optional[float] = None, scan_chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        if bimamba_type not in BIMAMBA_TYPES:
            raise ValueError(f'bimamba_type={bimamba_type!r} is not supported; choose one of {BIMAMBA_TYPES}')
        inner_dims = expand * embed_dims
        dt_rank = math.ceil(embed_dims / 16) if dt_rank is None else dt_rank
        self.bimamba_type = bimamba_type
        self.divide_out = divide_out
        self.in_proj = nn.Linear(embed_dims, 2 * inner_dims, bias=False)
        self.forward_branch = SelectiveSSM(inner_dims, d_state, d_conv, dt_rank, scan_chunk_size=scan_chunk_size)
        if bimamba_type == 'v2':
            self.backward_branch = SelectiveSSM(inner_dims, d_state, d_conv, dt_rank, scan_chunk_size=scan_chunk_size)
        elif bimamba_type == 'v1':
            self.backward_A_log = nn.Parameter(s4d_real_a_log(inner_dims, d_state))
        self.out_proj = nn.Linear(inner_dims, embed_dims, bias=False)
        self.gamma = None if layer_scale is None else nn.Parameter(torch.full((embed_dims, ), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        """Mix ``x`` (batch, length, embed_dims) along the token axis."""
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        if self.bimamba_type == 'none':
            y = self.forward_branch(x, z)
        elif self.bimamba_type == 'v2':
            y = self.forward_branch(x, z) + self.backward_branch(x.flip(-1), z.flip(-1)).flip(-1)
            y = y / 2 if self.divide_out else y
        else:
            u, delta, B, C = self.forward_branch.project(x)
            backward = self.forward_branch.scan(*(t.flip(-1) for t in (u, delta, B, C, z)), A_log=self.backward_A_log)
            y = self.forward_branch.scan(u, delta, B, C, z) + backward.flip(-1)
        out = self.out_proj(y.transpose(1, 2))
        return out if self.gamma is None else out * self.gamma
