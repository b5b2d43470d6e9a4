"""The Vision-LSTM block: pre-norm residual around an mLSTM mixer (VisionLSTM2's ``ViLBlock`` / ``ViLLayer``).

Numerics follow the official code exactly (vil_spec.md §2.4-2.6); the norms are plain ``nn.LayerNorm`` holding the
effective scale (the official residual-weight norms store ``scale - 1``; the checkpoint converter adds the 1).
Deliberate deviation: the 2-D depthwise conv reshapes tokens with the true input grid, not the build-time grid.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from .linear import linear
from .mixer_ops import (conv_qkv, defers_input_biases, gated_output, gated_output_, mixer_core,
                        mixer_core_chunk_size, reads_strided_halves, use_mixer_core)
from .mixer_ops.reference import CONV_KINDS, block_diagonal
from .mlstm import MLSTM_BACKENDS, chunkwise_inference, mlstm, resolve_backend
from .mlstm.chunkwise import CHUNK_SIZE
from .norm_ops import add_layer_norm, adds_update_biases, compute_dtype, layer_norm


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
        return block_diagonal(x, self.weight[None], None if self.bias is None else self.bias[None])


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm of each head's channels separately (official ``outnorm``: group norm, one group per head).

    Holds the parameters; the mixer applies it fused with the skip and the output gate (:func:`~.mixer_ops.
    gated_output`). ``forward`` maps ``(B, N, NH, DH)`` heads to normalised ``(B, N, NH * DH)``.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, heads: Tensor) -> Tensor:
        normed = F.layer_norm(heads, heads.shape[-1:], eps=self.eps).flatten(2) * self.weight
        return normed if self.bias is None else normed + self.bias


class MLSTMMixer(nn.Module):
    """Gated mLSTM token mixer: up-projection, depthwise conv, q/k/v, mLSTM cell, output gate, down-projection.

    Tokens stay in the image's row-major order in every block: a ``reverse`` block rotates its conv kernel and runs
    the mLSTM anti-causally instead of flipping the tokens (the same function, see :mod:`.mixer_ops`).

    Args:
        embed_dims: token width D.
        expansion: inner width E = expansion * D.
        num_heads: mLSTM heads (4 in every released model).
        qkv_block_size: block size of the block-diagonal q/k/v projections.
        conv_kind: ``'2d'`` (VisionLSTM2: odd square kernel on the token grid) or ``'causal1d'`` (VisionLSTM v1:
            causal along the token sequence of the block's traversal direction).
        conv_kernel_size: kernel size of the depthwise conv (odd for ``'2d'``).
        proj_bias: biases in the up, q/k/v and down projections (VisionLSTM2: yes; v1: no).
        norm_bias: bias in the per-head output norm (VisionLSTM2: yes; v1: no).
        init_num_blocks: ``num_blocks`` of the down-projection's wang init, std ``2 / num_blocks / sqrt(D)``: 1 for
            the official ``init_weights='original'`` (all released models), the number of blocks for
            ``'original-fixed'``.
        reverse: traverse the tokens bottom-right to top-left (odd blocks of the official model).
        mlstm_backend: backend of :func:`mmseg_vil.models.layers.mlstm.mlstm`.
    """

    def __init__(self, embed_dims: int, expansion: int = 2, num_heads: int = 4, qkv_block_size: int = 4,
                 conv_kind: str = '2d', conv_kernel_size: int = 3, proj_bias: bool = True, norm_bias: bool = True,
                 init_num_blocks: int = 1, reverse: bool = False, mlstm_backend: str = 'parallel') -> None:
        super().__init__()
        inner = expansion * embed_dims
        if inner % num_heads:
            raise ValueError(f'inner width {inner} must be divisible by num_heads={num_heads}')
        if conv_kind not in CONV_KINDS:
            raise ValueError(f'conv_kind={conv_kind!r} is not supported; choose one of {CONV_KINDS}')
        if conv_kind == '2d' and conv_kernel_size % 2 == 0:
            raise ValueError(f'conv_kernel_size={conv_kernel_size} must be odd (same-size depthwise conv)')
        if mlstm_backend not in MLSTM_BACKENDS:  # here, not at the first forward: a config typo fails before training
            raise ValueError(f'mlstm_backend={mlstm_backend!r} is not available here; choose one of '
                             f'{sorted(MLSTM_BACKENDS)} (fused and fused_chunkwise need Triton)')
        self.embed_dims, self.inner_dims, self.num_heads = embed_dims, inner, num_heads
        self.conv_kind = conv_kind
        self.init_num_blocks = init_num_blocks
        self.reverse = reverse
        self.mlstm_backend = mlstm_backend
        self.proj_up = nn.Linear(embed_dims, 2 * inner, bias=proj_bias)
        # Holds the kernel; conv_qkv pads (same size, or causal) and rotates it for reverse blocks.
        self.conv = (nn.Conv2d(inner, inner, conv_kernel_size, padding=conv_kernel_size // 2, groups=inner)
                     if conv_kind == '2d' else nn.Conv1d(inner, inner, conv_kernel_size, groups=inner))
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size, bias=proj_bias)
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        self.outnorm = MultiHeadLayerNorm(inner, num_heads, bias=norm_bias)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, embed_dims, bias=proj_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official ``init_weights='original'`` / ``'original-fixed'`` scheme (vil_spec.md §3)."""
        small_init_std = math.sqrt(2 / (5 * self.embed_dims))
        for proj in (self.proj_up, self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=small_init_std)
        nn.init.normal_(self.proj_down.weight, std=2 / self.init_num_blocks / math.sqrt(self.embed_dims))
        for proj in (self.proj_up, self.q_proj, self.k_proj, self.v_proj, self.proj_down, self.outnorm):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.outnorm.weight)
        nn.init.ones_(self.learnable_skip)

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(B, N, NH * DH)`` -> ``(B, NH, N, DH)`` view."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        """``x (B, N, D)`` pre-normed tokens in row-major order of ``grid = (h, w)``."""
        return self._mix(x, grid, defer_down_bias=False)[0]

    def forward_deferring_bias(self, x: Tensor, grid: Tuple[int, int]) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`forward`'s output before the down-projection's bias, and that bias for the caller to add (the next
        block's norm adds it with the residual: one pass over the output fewer); where the one-node GPU mixer runs,
        its output and None."""
        return self._mix(x, grid, defer_down_bias=True)

    def _project_down(self, out: Tensor, defer_bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
        if defer_bias and self.proj_down.bias is not None:
            return F.linear(out, self.proj_down.weight), self.proj_down.bias
        return self.proj_down(out), None

    def _mix(self, x: Tensor, grid: Tuple[int, int], defer_down_bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
        if reads_strided_halves(x):  # one product, its halves read in place
            xz = linear(x, self.proj_up.weight, self.proj_up.bias)
            x_mlstm, z = xz.chunk(2, dim=-1)
            up_biases = (None, None)  # added by the product
        else:
            xz = None
            up_biases = (None, None) if self.proj_up.bias is None else self.proj_up.bias.chunk(2)
            deferred = up_biases[0] is not None and defers_input_biases(
                x, self.conv_kind, self.proj_up.weight, self.proj_up.bias, self.conv.weight, self.outnorm.weight)
            if deferred:  # one product: the C++ kernels read its halves in place and add the biases as they read them
                x_mlstm, z = F.linear(x, self.proj_up.weight).chunk(2, dim=-1)
            else:  # two products, each contiguous for the reference's channels-last conv and tile products
                x_mlstm, z = (F.linear(x, weight, bias)
                              for weight, bias in zip(self.proj_up.weight.chunk(2), up_biases))
                up_biases = (None, None)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        backend = resolve_backend(self.mlstm_backend, self._split_heads(x_mlstm))
        has_biases = all(module.bias is not None for module in (self.q_proj, self.outnorm, self.proj_down))
        if xz is not None and use_mixer_core(x_mlstm, self.conv_kind, has_biases, backend):
            # the kernels read the parameters where they are: no stacked copies
            return mixer_core(xz, *grid, self.conv.weight, self.conv.bias, *(p.weight for p in projections),
                              *(p.bias for p in projections), self.igate.weight, self.fgate.weight, self.igate.bias,
                              self.fgate.bias, self.outnorm.weight, self.outnorm.bias, self.learnable_skip,
                              self.proj_down.weight, self.proj_down.bias, self.num_heads, self.outnorm.eps,
                              self.reverse, mixer_core_chunk_size(x_mlstm, backend))[0], None
        qkv_weight = torch.stack([p.weight for p in projections])
        qkv_bias = None if self.q_proj.bias is None else torch.stack([p.bias for p in projections])
        gate_weight = torch.cat([self.igate.weight, self.fgate.weight])
        gate_bias = torch.cat([self.igate.bias, self.fgate.bias])
        layout = None
        if xz is None and backend == 'chunkwise' and chunkwise_inference.supports(x_mlstm, self.conv.weight, qkv_weight,
                                                                                   gate_weight):
            # the CPU inference path: q/k/v written into the cell's chunk layout, h token-major for the output norm
            batch, n, _ = x_mlstm.shape
            layout = chunkwise_inference.Layout(batch, self.num_heads, n, self.inner_dims // self.num_heads,
                                                chunkwise_inference.chunk_size(x_mlstm, CHUNK_SIZE), self.reverse,
                                                x_mlstm.dtype, x_mlstm.device)
        x_conv, qkv, gates = conv_qkv(x_mlstm, grid, self.conv.weight, self.conv.bias, qkv_weight, qkv_bias,
                                      gate_weight, gate_bias, self.num_heads, self.reverse, self.conv_kind,
                                      None if layout is None else layout.real, up_biases[0])
        igate, fgate = gates.chunk(2, dim=1)
        if layout is None:
            h = mlstm(*qkv, igate, fgate, backend=backend, reverse=self.reverse).transpose(1, 2)
        else:
            # z is this path's own temporary (a product's output or its half): overwritten by the gated output, the
            # C++ cell's epilogue where it runs
            norm_args = (self.outnorm.weight, self.outnorm.bias, self.learnable_skip, self.outnorm.eps)
            if chunkwise_inference.cell_gated_output_(*layout.qkv, igate, fgate, layout.length, self.reverse, x_conv,
                                                      z, *norm_args, up_biases[1]):
                return self._project_down(z, defer_down_bias)
            # the cell's output unscaled, its rows' factors applied by the output norm as it reads them
            h_scale = chunkwise_inference.cell_unscaled(*layout.qkv, igate, fgate, layout.length, self.reverse)
            if h_scale is None:
                h = x_mlstm.new_empty(batch, n, self.num_heads, self.inner_dims // self.num_heads)
                h.transpose(1, 2).copy_(mlstm(*qkv, igate, fgate, backend=backend, reverse=self.reverse))
            else:
                h, h_scale = (t.transpose(1, 2) for t in h_scale)
            return self._project_down(gated_output_(h, x_conv, z, *norm_args, h_scale, up_biases[1]), defer_down_bias)
        if up_biases[1] is not None:
            z = z + up_biases[1]
        out = gated_output(h, x_conv, z, self.outnorm.weight, self.outnorm.bias, self.learnable_skip, self.outnorm.eps)
        return self._project_down(out, defer_down_bias)


Update = Tuple[Tensor, Optional[Tensor]]  # a block's output not yet added to the stream, and a bias still to add to it


def add_update(x: Tensor, update: Update) -> Tensor:
    """The stream ``x`` plus a block's :data:`Update`, rounded as the block's bias add and residual add round it."""
    value, bias = update
    return x + (value if bias is None else value + bias)


class ViLBlock(nn.Module):
    """``x + drop_path(mixer(norm(x)))``; ``reverse`` selects the traversal direction of the mixer.

    :meth:`forward_update` leaves the residual add to the next block, whose norm kernel adds it as it reads the stream
    (:func:`~.norm_ops.add_layer_norm`; where its kernel takes it, also the down-projection's bias); the backbone
    chains blocks that way where the norms run as kernels.
    """

    def __init__(self, embed_dims: int, reverse: bool, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 norm_bias: bool = True, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps, bias=norm_bias)
        self.mixer = MLSTMMixer(embed_dims, norm_bias=norm_bias, reverse=reverse, **mixer_kwargs)
        self.drop_path = DropPath(drop_path)

    def _norm_args(self, x: Tensor) -> tuple:
        # the norm written in the dtype the up-projection runs in (no cast of its output under autocast)
        return self.norm.weight, self.norm.bias, self.norm.eps, compute_dtype(x)

    def _infers(self) -> bool:
        """Whether the block runs without autograd and without drop-path draws: its output may be added in place."""
        return not (torch.is_grad_enabled() or (self.training and self.drop_path.drop_prob > 0))

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        normed = layer_norm(x, *self._norm_args(x))
        if not self._infers():
            return x + self.drop_path(self.mixer(normed, grid))
        out = self.mixer(normed, grid)
        if out.dtype != x.dtype:  # autocast: a 16-bit mixer output, the residual stream stays in x's dtype
            return x + out
        return out.add_(x)  # inference: the mixer's output is a new tensor; no extra buffer

    def forward_update(self, x: Tensor, update: Optional[Update], grid: Tuple[int, int]) -> Tuple[Tensor, Update]:
        """The stream ``x`` plus the previous block's :data:`Update` (None for none) and this block's update
        ``drop_path(mixer(norm(...)))``, not yet added."""
        if update is None:
            normed = layer_norm(x, *self._norm_args(x))
        else:
            x, normed = add_layer_norm(x, *update, *self._norm_args(x))
        if self._infers() and adds_update_biases(x):
            return x, self.mixer.forward_deferring_bias(normed, grid)
        return x, (self.drop_path(self.mixer(normed, grid)), None)
