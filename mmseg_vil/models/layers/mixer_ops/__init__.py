"""Fused stages of the ViL mixer around the mLSTM cell (see :mod:`.reference` for what they compute).

On CUDA (or under ``TRITON_INTERPRET=1``) they run as our Triton kernels; on the CPU without autograd as our C++ kernels
where they build (:mod:`..cpu_kernels`); elsewhere, and for options the kernels do not cover, as the PyTorch reference.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import cpu_kernels
from . import reference

try:
    from ..mlstm.fused_chunkwise import op as chunkwise_mlstm
    from . import triton_ops
    from .mixer_core import mixer_core
except ImportError:  # no Triton
    chunkwise_mlstm = triton_ops = mixer_core = None


def _use_kernels(x: Tensor) -> bool:
    return (triton_ops is not None and x.dtype in triton_ops.SUPPORTED_DTYPES
            and (x.is_cuda or triton_ops.kernels_interpreted()))


def reads_strided_halves(x: Tensor) -> bool:
    """Whether the mixer's stages for activations like ``x`` read ``x_mlstm`` and ``z`` in place as the halves of one
    up-projection output (the kernels), rather than as two contiguous products (the reference: its conv and tile
    products would copy a strided ``x_mlstm``)."""
    return _use_kernels(x)


def use_mixer_core(x: Tensor, conv_kind: str, has_biases: bool, mlstm_backend: str) -> bool:
    """Whether :func:`.mixer_core.mixer_core` runs the mixer for ``x (B, N, E)``: where the mixer kernels run, for the
    options they cover (2d conv, biases) and the Triton mLSTM backends (``fused``, ``fused_chunkwise``)."""
    return (_use_kernels(x) and conv_kind == '2d' and has_biases
            and mlstm_backend in ('fused', 'fused_chunkwise'))


def mixer_core_chunk_size(x: Tensor, mlstm_backend: str) -> int:
    """:func:`.mixer_core.mixer_core`'s ``chunk_size`` for a mixer with the given (resolved) mLSTM backend: 0 for the
    quadratic ``fused`` kernels, the chunkwise kernels' default chunk for ``fused_chunkwise`` (refused for float32 CUDA
    tensors, as that backend is: :func:`~..mlstm.fused_chunkwise.op.refuse_unvalidated_cuda`)."""
    if mlstm_backend != 'fused_chunkwise':
        return 0
    chunkwise_mlstm.refuse_unvalidated_cuda(x)
    return chunkwise_mlstm.DEFAULT_CHUNK_SIZE


def defers_input_biases(x: Tensor, conv_kind: str, *weights: Optional[Tensor]) -> bool:
    """Whether :func:`conv_qkv` and :func:`gated_output_` for activations like ``x`` (and these weights) run as the C++
    kernels, which add the up-projection's biases as they read its output (``input_bias``, ``z_bias``): then the
    up-projection can leave them out (a bias in ``F.linear`` is a pass over its output)."""
    return conv_kind == '2d' and cpu_kernels.usable(x, *weights)


def conv_qkv(x: Tensor, grid: Tuple[int, int], conv_weight: Tensor, conv_bias: Optional[Tensor], qkv_weight: Tensor,
             qkv_bias: Optional[Tensor], gate_weight: Tensor, gate_bias: Tensor, num_heads: int, reverse: bool,
             conv_kind: str = '2d', out: Optional[Tensor] = None,
             input_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(silu(conv(x)), qkv (3, B, NH, N, DH), gates (B, G, N))``: :func:`.reference.conv_qkv_heads` and
    :func:`.reference.folded_gate_preactivations`. The kernels (for the released models' options: 2d conv, biases) write
    q/k/v token-major (``qkv`` is a view of that buffer) and the gates in float32 or above, in the same pass.
    ``out``: the reference's q/k/v buffer (:func:`.reference.conv_qkv_heads`); only where the kernels do not run
    (:func:`reads_strided_halves` is false). ``input_bias``: a bias of ``x`` not yet added (see
    :func:`defers_input_biases`); the function is that of ``x + input_bias``."""
    if _use_kernels(x) and conv_kind == '2d' and conv_bias is not None and qkv_bias is not None:
        x_conv, qkv, gates = triton_ops.conv_qkv(x, *grid, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight,
                                                 gate_bias, reverse)
        return x_conv, qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4), gates
    if conv_kind == '2d' and cpu_kernels.usable(x, input_bias, conv_weight, conv_bias, qkv_weight, qkv_bias,
                                                gate_weight, gate_bias):
        return cpu_kernels.conv_qkv_gates(x, grid, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight,
                                          gate_bias, num_heads, reverse, out, input_bias)
    if input_bias is not None:
        x = x + input_bias
    # The conv and the tile products read x channels-last: a strided x is copied once here, not inside each.
    x_conv, qkv = reference.conv_qkv_heads(x.contiguous(), grid, conv_weight, conv_bias, qkv_weight, qkv_bias,
                                           num_heads, reverse, conv_kind, out)
    if reference.counting_flops():  # the official operation count
        return x_conv, qkv, reference.gate_preactivations(qkv, gate_weight, gate_bias)
    return x_conv, qkv, reference.folded_gate_preactivations(x_conv, x, qkv_weight, qkv_bias, gate_weight, gate_bias)


def gated_output(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor],
                 skip: Tensor, eps: float) -> Tensor:
    """See :func:`.reference.gated_output`."""
    if _use_kernels(x_conv) and norm_bias is not None:
        return triton_ops.gated_output(h, x_conv, z, norm_weight, norm_bias, skip, eps)
    return reference.gated_output(h, x_conv, z, norm_weight, norm_bias, skip, eps)


def gated_output_(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor],
                  skip: Tensor, eps: float, h_scale: Optional[Tensor] = None,
                  z_bias: Optional[Tensor] = None) -> Tensor:
    """See :func:`.reference.gated_output_` (the CPU inference path, overwriting ``z``), of ``h (B, N, NH, DH)`` (any
    strides) times ``h_scale (B, N, NH, 1)`` if given, and of ``z + z_bias`` (a bias not yet added, see
    :func:`defers_input_biases`): the C++ kernel where usable (it scales h's rows and adds z's bias as it reads
    them)."""
    if cpu_kernels.rows_strided(z) and cpu_kernels.usable(h, h_scale, x_conv, z, z_bias, norm_weight, norm_bias,
                                                          skip):
        return cpu_kernels.gated_output_(h, x_conv, z, norm_weight, norm_bias, skip, eps, h_scale, z_bias)
    if z_bias is not None:
        z.add_(z_bias)
    if h_scale is not None:  # h token-major for the norm (as the cell writes it where it scales the rows itself)
        h = torch.mul(h, h_scale, out=h.new_empty(h.shape))
    return reference.gated_output_(h, x_conv, z, norm_weight, norm_bias, skip, eps)


__all__ = ['conv_qkv', 'defers_input_biases', 'gated_output', 'gated_output_', 'mixer_core', 'mixer_core_chunk_size',
           'reads_strided_halves', 'use_mixer_core']
