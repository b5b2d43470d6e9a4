"""The Vision-LSTM block: pre-norm residual around an mLSTM mixer (VisionLSTM2's ``ViLBlock`` / ``ViLLayer``).

Numerics follow the official code exactly (vil_spec.md §2.4-2.6); the norms are plain ``nn.LayerNorm`` holding the
effective scale (the official residual-weight norms store ``scale - 1``; the checkpoint converter adds the 1).
Deliberate deviation: the depthwise conv reshapes tokens with the true input grid, not the build-time grid.
"""
import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from .mlstm import mlstm


class BlockDiagonalLinear(nn.Module):
    """Linear map whose weight is block-diagonal with ``block_size`` x ``block_size`` blocks (official "headwise").

    ``weight[b, o, i]`` maps input channel ``b * block_size + i`` to output channel ``b * block_size + o``. On CPU
    the blocks are applied as a batched product (few FLOPs); on GPUs one dense GEMM with the zero-filled matrix is
    faster than the strided small products, see :func:`block_diagonal_linear`.
    """

    def __init__(self, dim: int, block_size: int = 4, bias: bool = True) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f'dim={dim} must be divisible by the q/k/v block size {block_size}')
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def dense_weight(self) -> Tensor:
        """The ``(dim, dim)`` block-diagonal matrix in ``nn.Linear`` layout."""
        num_blocks = self.weight.shape[0]
        eye = torch.eye(num_blocks, dtype=self.weight.dtype, device=self.weight.device)
        return (self.weight.unsqueeze(2) * eye[:, None, :, None]).flatten(2).flatten(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return block_diagonal_linear(x, [self])


def block_diagonal_linear(x: Tensor, projections: Sequence[BlockDiagonalLinear]) -> Tensor:
    """Apply several block-diagonal projections to the same input; outputs concatenated on the last dim."""
    if x.is_cuda:
        weight = torch.cat([p.dense_weight() for p in projections])
        return F.linear(x, weight, torch.cat([p.bias for p in projections]))
    blocks = x.unflatten(-1, (-1, projections[0].block_size))
    outs = [torch.einsum('...bi,boi->...bo', blocks, p.weight).flatten(-2) + p.bias for p in projections]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm of each head's channels separately (official ``outnorm``: group norm, one group per head)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, heads: Tensor) -> Tensor:
        """``heads (B, NH, N, DH)`` -> normalised ``(B, N, NH * DH)``."""
        normed = F.layer_norm(heads, heads.shape[-1:], eps=self.eps)
        return normed.transpose(1, 2).flatten(2) * self.weight + self.bias


class MLSTMMixer(nn.Module):
    """Gated mLSTM token mixer: up-projection, 3x3 depthwise conv, q/k/v, mLSTM cell, output gate, down-projection.

    Args:
        embed_dims: token width D.
        expansion: inner width E = expansion * D.
        num_heads: mLSTM heads (4 in every released model).
        qkv_block_size: block size of the block-diagonal q/k/v projections.
        conv_kernel_size: kernel of the depthwise conv on the token grid.
        reverse: traverse the tokens bottom-right to top-left (odd blocks of the official model).
        mlstm_backend: backend of :func:`mmseg_vil.models.layers.mlstm.mlstm`.
    """

    def __init__(self, embed_dims: int, expansion: int = 2, num_heads: int = 4, qkv_block_size: int = 4,
                 conv_kernel_size: int = 3, reverse: bool = False, mlstm_backend: str = 'parallel') -> None:
        super().__init__()
        inner = expansion * embed_dims
        if inner % num_heads:
            raise ValueError(f'inner width {inner} must be divisible by num_heads={num_heads}')
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

    def _gates(self, qk: Tensor, v: Tensor) -> Tensor:
        """Input and forget gate pre-activations ``(B, N, 2 NH)`` from ``cat([q, k, v])``, without the concat."""
        weight = torch.cat([self.igate.weight, self.fgate.weight])
        bias = torch.cat([self.igate.bias, self.fgate.bias])
        split = qk.shape[-1]
        return F.linear(qk, weight[:, :split], bias) + F.linear(v, weight[:, split:])

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        """``x (B, N, D)`` pre-normed tokens in row-major order of ``grid = (h, w)``."""
        if self.reverse:
            x = x.flip(1)
        x_mlstm, z = self.proj_up(x).chunk(2, dim=-1)
        # Row-major tokens of the (possibly flipped = 180-degree rotated) grid as an image for the conv.
        image = x_mlstm.transpose(1, 2).unflatten(-1, grid)
        x_conv = F.silu(self.conv(image).flatten(2).transpose(1, 2))
        qk = block_diagonal_linear(x_conv, [self.q_proj, self.k_proj])
        v = self.v_proj(x_mlstm)
        igate, fgate = self._gates(qk, v).transpose(1, 2).chunk(2, dim=1)
        q, k = qk.chunk(2, dim=-1)
        h = mlstm(self._split_heads(q), self._split_heads(k), self._split_heads(v), igate, fgate,
                  backend=self.mlstm_backend)
        h = (self.outnorm(h) + self.learnable_skip * x_conv) * F.silu(z)
        y = self.proj_down(h)
        return y.flip(1) if self.reverse else y


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
