"""The Vision-LSTM block: pre-norm residual around an mLSTM mixer (VisionLSTM2's ``ViLBlock`` / ``ViLLayer``).

Numerics follow the official code exactly (vil_spec.md §2.4-2.6); the norms are plain ``nn.LayerNorm`` holding the
effective scale (the official residual-weight norms store ``scale - 1``; the checkpoint converter adds the 1).
Deliberate deviation: the depthwise conv reshapes tokens with the true input grid, not the build-time grid.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from .mixer_ops import conv_qkv, gated_output
from .mixer_ops.reference import block_diagonal
from .mlstm import mlstm


class BlockDiagonalLinear(nn.Module):
    """Linear map whose weight is block-diagonal with ``block_size`` x ``block_size`` blocks (official "headwise").

    ``weight[b, o, i]`` maps input channel ``b * block_size + i`` to output channel ``b * block_size + o``. The
    mixer applies q, k and v together (:func:`~.mixer_ops.conv_qkv`); ``forward`` is the single projection.
    """

    def __init__(self, dim: int, block_size: int = 4, bias: bool = True) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f'dim={dim} must be divisible by the q/k/v block size {block_size}')
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias if self.bias is not None else self.weight.new_zeros(x.shape[-1])
        return block_diagonal(x, self.weight[None], bias[None])


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm of each head's channels separately (official ``outnorm``: group norm, one group per head).

    Holds the parameters; the mixer applies it fused with the skip and the output gate (:func:`~.mixer_ops.
    gated_output`). ``forward`` maps ``(B, N, NH, DH)`` heads to normalised ``(B, N, NH * DH)``.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, heads: Tensor) -> Tensor:
        return F.layer_norm(heads, heads.shape[-1:], eps=self.eps).flatten(2) * self.weight + self.bias


class MLSTMMixer(nn.Module):
    """Gated mLSTM token mixer: up-projection, 3x3 depthwise conv, q/k/v, mLSTM cell, output gate, down-projection.

    Tokens stay in the image's row-major order in every block: a ``reverse`` block rotates its conv kernel and runs
    the mLSTM anti-causally instead of flipping the tokens (the same function, see :mod:`.mixer_ops`).

    Args:
        embed_dims: token width D.
        expansion: inner width E = expansion * D.
        num_heads: mLSTM heads (4 in every released model).
        qkv_block_size: block size of the block-diagonal q/k/v projections.
        conv_kernel_size: kernel of the depthwise conv on the token grid (odd).
        reverse: traverse the tokens bottom-right to top-left (odd blocks of the official model).
        mlstm_backend: backend of :func:`mmseg_vil.models.layers.mlstm.mlstm`.
    """

    def __init__(self, embed_dims: int, expansion: int = 2, num_heads: int = 4, qkv_block_size: int = 4,
                 conv_kernel_size: int = 3, reverse: bool = False, mlstm_backend: str = 'parallel') -> None:
        super().__init__()
        inner = expansion * embed_dims
        if inner % num_heads:
            raise ValueError(f'inner width {inner} must be divisible by num_heads={num_heads}')
        if conv_kernel_size % 2 == 0:
            raise ValueError(f'conv_kernel_size={conv_kernel_size} must be odd (same-size depthwise conv)')
        self.embed_dims, self.inner_dims, self.num_heads = embed_dims, inner, num_heads
        self.reverse = reverse
        self.mlstm_backend = mlstm_backend
        self.proj_up = nn.Linear(embed_dims, 2 * inner)
        self.conv = nn.Conv2d(inner, inner, conv_kernel_size, padding=conv_kernel_size // 2, groups=inner)
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        self.outnorm = MultiHeadLayerNorm(inner, num_heads)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official ``init_weights='original'`` scheme (vil_spec.md §3)."""
        small_init_std = math.sqrt(2 / (5 * self.embed_dims))
        for proj in (self.proj_up, self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=small_init_std)
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.proj_down.weight, std=2 / math.sqrt(self.embed_dims))
        nn.init.zeros_(self.proj_down.bias)
        self.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.outnorm.weight)
        nn.init.zeros_(self.outnorm.bias)
        nn.init.ones_(self.learnable_skip)

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(B, N, NH * DH)`` -> ``(B, NH, N, DH)`` view."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        """``x (B, N, D)`` pre-normed tokens in row-major order of ``grid = (h, w)``."""
        inner = self.inner_dims
        # Two products instead of one + chunk: each output is contiguous, so the conv reads it channels-last.
        x_mlstm = F.linear(x, self.proj_up.weight[:inner], self.proj_up.bias[:inner])
        z = F.linear(x, self.proj_up.weight[inner:], self.proj_up.bias[inner:])
        qkv_weight = torch.stack([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv_bias = torch.stack([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        x_conv, qkv = conv_qkv(x_mlstm, grid, self.conv.weight, self.conv.bias, qkv_weight, qkv_bias, self.reverse)
        gates = F.linear(qkv, torch.cat([self.igate.weight, self.fgate.weight]),
                         torch.cat([self.igate.bias, self.fgate.bias]))
        igate, fgate = gates.transpose(1, 2).chunk(2, dim=1)
        q, k, v = (self._split_heads(t) for t in qkv.chunk(3, dim=-1))
        h = mlstm(q, k, v, igate, fgate, backend=self.mlstm_backend, reverse=self.reverse)
        out = gated_output(h.transpose(1, 2), x_conv, z, self.outnorm.weight, self.outnorm.bias, self.learnable_skip,
                           self.outnorm.eps)
        return self.proj_down(out)


class ViLBlock(nn.Module):
    """``x + drop_path(mixer(norm(x)))``; ``reverse`` selects the traversal direction of the mixer."""

    def __init__(self, embed_dims: int, reverse: bool, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 **mixer_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.mixer = MLSTMMixer(embed_dims, reverse=reverse, **mixer_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        return x + self.drop_path(self.mixer(self.norm(x), grid))
