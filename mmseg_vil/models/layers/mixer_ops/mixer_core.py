"""The mixer after its up-projection as one autograd node on the Triton kernels: conv + SiLU + q/k/v, gate
pre-activations, fused mLSTM, per-head norm + skip + output gate, down-projection.

Why one node: as separate ops, autograd keeps every op's inputs until the backward (per token and block: the conv
output, q | k | v, the cell output and the gated output, besides the projections' inputs), so ViL-T held 2.2x the
activation memory of DeiT-T at 512 px. Here the backward recomputes the conv's pre-activation and q | k | v from the
saved up-projection output (one conv kernel launch: elementwise work next to the GEMMs; the kernels that need the
conv's SiLU recompute it from the pre-activation as they read it), and the gated output inside the
norm + gate backward kernel (one more store), and keeps only the up-projection output ``x_mlstm | z``, the cell
output, the gates and the cell's per-step statistics. The cell writes its q | k | v gradients into one buffer, and
the conv backward adds the gate pre-activations' share to them as it reads them. The kernels read ``x_mlstm`` and
``z`` as the two halves of the up-projection's output and write their gradients into the halves of one buffer, so
the up-projection is one product forward and backward (no second product, bias sum and gradient sum).

The function and its gradients are those of the composition in :class:`~..vil_block.MLSTMMixer` (tested against
it); the op is used where those kernels run (CUDA, or the interpreter) with the ``fused`` mLSTM backend. Products
take the dtype of the activations, as autocast gives them outside the op.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..custom_op import custom_op
from ..column_sums import column_sums
from ..mlstm import fused as fused_mlstm
from ..mlstm.fused_chunkwise import op as chunkwise_mlstm
from . import triton_ops

MLSTM_EPS = 1e-6  # the cell's normaliser eps (the official default)


def _split_heads(qkv: Tensor, heads: int) -> List[Tensor]:
    """``(B, N, 3E)`` -> q, k, v as ``(B, NH, N, DH)`` views."""
    return [t.view(*t.shape[:-1], heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]


def _projections(q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor, k_bias: Tensor, v_bias: Tensor,
                 igate_weight: Tensor, fgate_weight: Tensor, igate_bias: Tensor,
                 fgate_bias: Tensor) -> triton_ops.Projections:
    return triton_ops.Projections((q_weight, k_weight, v_weight), (q_bias, k_bias, v_bias),
                                  (igate_weight, fgate_weight), (igate_bias, fgate_bias))


@custom_op('mmseg_vil::mixer_core')
def mixer_core(xz: Tensor, height: int, width: int, conv_weight: Tensor, conv_bias: Tensor, q_weight: Tensor,
               k_weight: Tensor, v_weight: Tensor, q_bias: Tensor, k_bias: Tensor, v_bias: Tensor, igate_weight: Tensor,
               fgate_weight: Tensor, igate_bias: Tensor, fgate_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
               skip: Tensor, down_weight: Tensor, down_bias: Tensor, heads: int, norm_eps: float, reverse: bool,
               chunk_size: int) -> List[Tensor]:
    """The mixer's output ``(B, N, D)`` for the up-projection output ``xz = x_mlstm | z (B, N, 2E)``, then what the
    backward keeps: the down-projection's weight in the activations' dtype (cast once per step, not again in the
    backward), the cell output ``(B, N, NH, DH)``, the gates ``(B, 2 NH, N)`` and the cell's per-step statistics. The
    q/k/v projections' and gates' parameters are the modules' own tensors (block-diagonal ``(E / 4, 4, 4)`` weights,
    ``(NH, 3 E)`` gate weights), read by the kernels where they are. ``chunk_size``: 0 runs the cell as
    the quadratic tile kernels (``fused``), else as the chunkwise kernels with chunks of that many steps
    (``fused_chunkwise``, linear in the tokens)."""
    x_mlstm, z = xz.chunk(2, dim=-1)
    projections = _projections(q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, igate_weight, fgate_weight,
                               igate_bias, fgate_bias)
    x_conv, qkv, gates = triton_ops.conv_forward(x_mlstm, height, width, conv_weight, conv_bias, projections, reverse)
    q_k_v, igate_fgate = _split_heads(qkv, heads), gates.chunk(2, dim=1)
    if chunk_size:
        h, *stats = chunkwise_mlstm.forward_kernels(*q_k_v, *igate_fgate, MLSTM_EPS, chunk_size, reverse)
    else:
        h, *stats = fused_mlstm.fused_forward(*q_k_v, *igate_fgate, MLSTM_EPS, reverse)
    out = triton_ops.gated_output(h, x_conv, z, norm_weight, norm_bias, skip, norm_eps)
    down_cast = down_weight.to(out.dtype, copy=True)  # a copy also in float32: an output may not alias an input
    return [F.linear(out, down_cast, down_bias.to(out.dtype)), down_cast, h, gates, *stats]


@mixer_core.register_fake
def _(xz, height, width, conv_weight, conv_bias, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, igate_weight,
      fgate_weight, igate_bias, fgate_bias, norm_weight, norm_bias, skip, down_weight, down_bias, heads, norm_eps,
      reverse, chunk_size):
    batch, n, inner = xz.shape[0], xz.shape[1], xz.shape[2] // 2
    q = xz.new_empty(batch, heads, n, inner // heads)
    h, *stats = fused_mlstm.empty_forward_outputs(q)
    if chunk_size:  # the chunkwise kernels keep the row sums and the chunk states
        stats = chunkwise_mlstm.empty_stats(q, chunk_size)
    return [xz.new_empty(batch, n, len(down_weight)), down_weight.to(xz.dtype, copy=True), h,
            triton_ops.empty_gates(xz, 2 * heads), *stats]


_NUM_PARAMS = 17  # conv weight and bias, q, k, v weights and biases, input and forget gate weights and biases, norm
# weight and bias, skip, down-projection weight and bias


@custom_op('mmseg_vil::mixer_core_backward')
def mixer_core_backward(grad_y: Tensor, xz: Tensor, height: int, width: int, conv_weight: Tensor, conv_bias: Tensor,
                        q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, q_bias: Tensor, k_bias: Tensor,
                        v_bias: Tensor, igate_weight: Tensor, fgate_weight: Tensor, igate_bias: Tensor,
                        fgate_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, skip: Tensor, down_weight: Tensor,
                        down_bias: Tensor, down_cast: Tensor, h: Tensor, gates: Tensor, stats: List[Tensor],
                        heads: int, norm_eps: float, reverse: bool, chunk_size: int) -> List[Tensor]:
    """The gradient of xz, and those of the parameters (in :func:`mixer_core`'s order) flattened into one tensor in
    the accumulator's dtype, from what the forward kept. One tensor: the reductions and products write the
    parameters' gradients straight into its slices, where separate outputs of a custom op would each need a copy."""
    x_mlstm, z = xz.chunk(2, dim=-1)
    projection_params = (q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, igate_weight, fgate_weight, igate_bias,
                         fgate_bias)
    conv_params = (conv_weight, conv_bias, *projection_params)
    params = (*conv_params, norm_weight, norm_bias, skip, down_weight, down_bias)
    flat = xz.new_empty(sum(p.numel() for p in params), dtype=_grad_dtype(xz))
    conv_part, norm_part, down_part = flat.split([sum(p.numel() for p in group)
                                                  for group in (conv_params, params[-5:-2], params[-2:])])
    grad_xz = torch.empty_like(xz, memory_format=torch.contiguous_format)
    grad_x_mlstm, grad_z = grad_xz.chunk(2, dim=-1)
    # the conv's pre-activation in place of its SiLU: the kernels below recompute the SiLU as they read it
    projections = _projections(*projection_params)
    pre, qkv = triton_ops.conv_pre_qkv(x_mlstm, height, width, conv_weight, conv_bias, projections, reverse)
    grad_out = grad_y @ down_cast
    grad_h, grad_x_conv, out = torch.empty_like(h), torch.empty_like(pre), torch.empty_like(pre)
    triton_ops.gated_output_backward_into(grad_out, h, pre, z, norm_weight, norm_bias, skip, norm_eps, grad_h,
                                          grad_x_conv, grad_z, out, norm_part, x_conv_from_pre=True)
    grad_y = grad_y.flatten(0, 1)
    down_part[:down_weight.numel()].view(down_weight.shape).copy_(grad_y.t() @ out.flatten(0, 1))
    down_part[down_weight.numel():].copy_(column_sums(grad_y))  # PyTorch's sum: 28 us per block at 224 b64 (H200)
    # The cell's gradients go straight into one q | k | v buffer and one gate buffer; the conv backward adds the gates'
    # share to the q | k | v gradient as it reads it.
    grad_qkv, grad_gates = torch.empty_like(qkv), torch.empty_like(gates)
    q_k_v, igate_fgate = _split_heads(qkv, heads), gates.chunk(2, dim=1)
    grad_q_k_v = [t.view(*t.shape[:-1], heads, -1) for t in grad_qkv.chunk(3, dim=-1)]
    if chunk_size:
        chunkwise_mlstm.backward_kernels_into(grad_h, *q_k_v, *igate_fgate, h, stats, MLSTM_EPS, chunk_size, reverse,
                                              *grad_q_k_v, *(g.transpose(1, 2) for g in grad_gates.chunk(2, dim=1)))
    else:
        fused_mlstm.backward_into(grad_h, *q_k_v, h, *igate_fgate, stats, MLSTM_EPS, reverse, *grad_q_k_v,
                                  *grad_gates.chunk(2, dim=1))
    triton_ops.conv_qkv_backward_into(grad_x_conv, grad_qkv, grad_gates, x_mlstm, pre, qkv, height, width,
                                      conv_weight, conv_bias, projections, reverse, grad_x_mlstm, conv_part)
    return [grad_xz, flat]


def _grad_dtype(xz: Tensor) -> torch.dtype:
    return torch.promote_types(xz.dtype, torch.float32)


@mixer_core_backward.register_fake
def _(grad_y, xz, height, width, *params_h_gates_stats_options):
    params = params_h_gates_stats_options[:_NUM_PARAMS]
    return [torch.empty_like(xz, memory_format=torch.contiguous_format),
            xz.new_empty(sum(p.numel() for p in params), dtype=_grad_dtype(xz))]


def _setup_context(ctx, inputs, output) -> None:
    xz, height, width, *params = inputs[:3 + _NUM_PARAMS]
    ctx.save_for_backward(xz, *params, *output[1:])
    ctx.options = (height, width, *inputs[3 + _NUM_PARAMS:])  # heads, norm_eps, reverse, chunk_size
    ctx.set_materialize_grads(False)


def _backward(ctx, grads):
    grad_y = grads[0]  # the other outputs are kept for the backward, not differentiated
    xz, *rest = ctx.saved_tensors
    params, (down_cast, h, gates, *stats) = rest[:_NUM_PARAMS], rest[_NUM_PARAMS:]
    height, width, *options = ctx.options
    if grad_y is None:
        grad_y = torch.zeros(*xz.shape[:2], len(params[-2]), dtype=xz.dtype, device=xz.device)
    grad_xz, flat = mixer_core_backward(grad_y, xz, height, width, *params, down_cast, h, gates, stats, *options)
    # .to only where a dtype differs: each call is a dispatch on the host that the eager GPU step waits for
    param_grads = (g.view(p.shape) if g.dtype == p.dtype else g.view(p.shape).to(p.dtype)
                   for g, p in zip(flat.split([p.numel() for p in params]), params))
    return grad_xz, None, None, *param_grads, *(None for _ in options)


mixer_core.register_autograd(_backward, setup_context=_setup_context)
