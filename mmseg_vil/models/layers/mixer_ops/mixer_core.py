"""The mixer between its two projections as one autograd node on the Triton kernels: conv + SiLU + q/k/v, gate
pre-activations, fused mLSTM, per-head norm + skip + output gate.

Why one node: as separate ops, autograd keeps every op's inputs until the backward (per token and block: the conv
output, q | k | v, the cell output and the gated output, besides the projections' inputs), so ViL-T held 2.2x the
activation memory of DeiT-T at 512 px. Here the backward recomputes the conv output and q | k | v from the saved
up-projection output (one conv kernel launch: elementwise work next to the GEMMs) and keeps only ``x_mlstm``, ``z``,
the cell output, the gates and the cell's per-step statistics. It also builds the gradient of q | k | v in one
buffer and adds the gate path's part with one batched product (the cell writes its gradients into it).

The function and its gradients are those of the composition in :class:`~..vil_block.MLSTMMixer` (tested against
it); the op is used where those kernels run (CUDA, or the interpreter) with the ``fused`` mLSTM backend.
"""
from typing import List

import torch
from torch import Tensor

from ..mlstm import fused as fused_mlstm
from . import triton_ops

MLSTM_EPS = 1e-6  # the cell's normaliser eps (the official default)


def _split_heads(qkv: Tensor, heads: int) -> List[Tensor]:
    """``(B, N, 3E)`` -> q, k, v as ``(B, NH, N, DH)`` views."""
    return [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]


def _gates(qkv: Tensor, gate_weight: Tensor, gate_bias: Tensor) -> Tensor:
    """``(B, 2 NH, N)`` input and forget gate pre-activations: each head's contiguous along the tokens. In the dtype
    of ``qkv`` (what autocast gives the batched product outside the op)."""
    weight = gate_weight.to(qkv.dtype).expand(len(qkv), -1, -1)
    return torch.baddbmm(gate_bias.to(qkv.dtype).view(1, -1, 1), weight, qkv.transpose(1, 2))


@torch.library.custom_op('mmseg_vil::mixer_core', mutates_args=())
def mixer_core(x_mlstm: Tensor, z: Tensor, height: int, width: int, conv_weight: Tensor, conv_bias: Tensor,
               qkv_weight: Tensor, qkv_bias: Tensor, gate_weight: Tensor, gate_bias: Tensor, norm_weight: Tensor,
               norm_bias: Tensor, skip: Tensor, heads: int, norm_eps: float, reverse: bool) -> List[Tensor]:
    """The gated output ``(B, N, E)``, then what the backward keeps: the cell output ``(B, N, NH, DH)``, the gates
    ``(B, 2 NH, N)`` and the cell's per-step statistics."""
    x_conv, qkv = triton_ops.conv_qkv(x_mlstm, height, width, conv_weight, conv_bias, qkv_weight, qkv_bias, reverse)
    gates = _gates(qkv, gate_weight, gate_bias)
    igate, fgate = gates.chunk(2, dim=1)
    h, *stats = fused_mlstm.fused_forward(*_split_heads(qkv, heads), igate, fgate, MLSTM_EPS, reverse)
    out = triton_ops.gated_output(h, x_conv, z, norm_weight, norm_bias, skip, norm_eps)
    return [out, h, gates, *stats]


@mixer_core.register_fake
def _(x_mlstm, z, height, width, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias, norm_weight,
      norm_bias, skip, heads, norm_eps, reverse):
    batch, n, inner = x_mlstm.shape
    h, *stats = fused_mlstm.empty_forward_outputs(x_mlstm.new_empty(batch, heads, n, inner // heads))
    return [torch.empty_like(x_mlstm), h, x_mlstm.new_empty(batch, 2 * heads, n), *stats]


@torch.library.custom_op('mmseg_vil::mixer_core_backward', mutates_args=())
def mixer_core_backward(grad_out: Tensor, x_mlstm: Tensor, z: Tensor, height: int, width: int, conv_weight: Tensor,
                        conv_bias: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, gate_weight: Tensor,
                        gate_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, skip: Tensor, h: Tensor,
                        gates: Tensor, stats: List[Tensor], heads: int, norm_eps: float,
                        reverse: bool) -> List[Tensor]:
    """Gradients of x_mlstm, z and the parameters (in :func:`mixer_core`'s order), from what the forward kept."""
    x_conv, qkv = triton_ops.conv_qkv(x_mlstm, height, width, conv_weight, conv_bias, qkv_weight, qkv_bias, reverse)
    grad_h, grad_x_conv, grad_z, *norm_grads = triton_ops.gated_output_backward(
        grad_out, h, x_conv, z, norm_weight, norm_bias, skip, norm_eps)
    # The cell's gradients go straight into one q | k | v buffer and one gate buffer.
    grad_qkv, grad_gates = torch.empty_like(qkv), torch.empty_like(gates)
    fused_mlstm.backward_into(grad_h, *_split_heads(qkv, heads), h, *gates.chunk(2, dim=1), stats, MLSTM_EPS, reverse,
                              *(t.unflatten(-1, (heads, -1)) for t in grad_qkv.chunk(3, dim=-1)),
                              *grad_gates.chunk(2, dim=1))
    grad_qkv.baddbmm_(grad_gates.transpose(1, 2), gate_weight.to(grad_qkv.dtype).expand(len(qkv), -1, -1))
    grad_gate_weight = grad_gates.transpose(0, 1).flatten(1) @ qkv.flatten(0, 1)
    grad_x, *conv_grads = triton_ops.conv_qkv_backward(grad_x_conv, grad_qkv, x_mlstm, height, width, conv_weight,
                                                       conv_bias, qkv_weight, reverse)
    return [grad_x, grad_z, *conv_grads, grad_gate_weight.to(gate_weight.dtype),
            grad_gates.sum((0, 2)).to(gate_bias.dtype), *norm_grads]


@mixer_core_backward.register_fake
def _(grad_out, x_mlstm, z, height, width, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias,
      norm_weight, norm_bias, skip, h, gates, stats, heads, norm_eps, reverse):
    like = (x_mlstm, z, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias, norm_weight, norm_bias,
            skip)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]


def _setup_context(ctx, inputs, output) -> None:
    (x_mlstm, z, height, width, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias, norm_weight,
     norm_bias, skip, heads, norm_eps, reverse) = inputs
    ctx.save_for_backward(x_mlstm, z, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias,
                          norm_weight, norm_bias, skip, *output[1:])
    ctx.options = (height, width, heads, norm_eps, reverse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grads):
    grad_out = grads[0]  # the other outputs are kept for the backward, not differentiated
    x_mlstm, z, *params, h, gates = ctx.saved_tensors[:13]
    height, width, heads, norm_eps, reverse = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(x_mlstm)
    grad_x, grad_z, *param_grads = mixer_core_backward(grad_out, x_mlstm, z, height, width, *params, h, gates,
                                                       list(ctx.saved_tensors[13:]), heads, norm_eps, reverse)
    return grad_x, grad_z, None, None, *param_grads, None, None, None


mixer_core.register_autograd(_backward, setup_context=_setup_context)
