"""The mixer's Triton kernels as torch.library custom ops with registered autograd (opaque to torch.compile).

Weights stay in their own dtype (float32 under autocast) and every kernel accumulates in float32 (float64 for
float64 inputs); activations are read and written in the input's dtype.
"""
import json
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..custom_op import custom_op
from ..column_sums import column_sums
from ..constants import full
from ..mlstm.fused import _kernels_interpreted as kernels_interpreted  # one interpreter switch for all
from . import _conv_qkv_kernels as conv_kernels
from . import _gated_output_kernels as gate_kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GROUP = conv_kernels.GROUP.value  # channels per block of the block-diagonal q/k/v
# Launch configurations of the mixer kernels: tokens per tile (BLOCK_T), channel groups per tile (BLOCK_G), warps;
# the backward launches also walk TILES token tiles per program, so their partial weight-gradient rows and
# cross-thread reductions fall by that factor. The fastest of benchmarks/tune_mixer_kernels.py on an H100 (Triton
# 3.6, ViL-T at 224 px batch 64 and 512 px batch 32, 2026-12-06, benchmarks/runs/2026-12-06_h100_tune/): large token
# tiles amortise the per-program weight loads (scalar: the conv weight is channel-strided, the 4x4 blocks are 16
# apart), e.g. the forward took 53.6 instead of 116 us at 224 with 64 instead of 8 tokens per tile.
# Forward: 4 warps, since its gate products are tl.dot, a warp-group MMA (wgmma) for tiles of 64 tokens and more with
# 4 warps; with 2 warps they are mma.sync whose operand layout Triton carries back into the conv (255 registers and
# spills, 115 us at 224). 128 tokens per tile: 46.8 us at 224 on an H100 (Triton 3.6; 58 us before the gate products
# were tl.dot, 2026-12-06). Its token tiles run over all images' tokens (no partly empty tile per image: 98 instead
# of 128 tiles of 128 at 224 px batch 64). LOOP_TAPS: the conv taps as a loop that is not unrolled, one tap's loads
# live at a time instead of all issued up front: ptxas (sm_90, bfloat16, with gates) 153 instead of 252 registers
# here, 96 instead of 140 with 64 tokens per tile (64 instead of 140 without gates, the backward's recomputation).
# Timed on an H100 (benchmarks/tune_mixer_kernels.py, 224 px b64, 2026-12-07): 44.3 us with LOOP_TAPS, 54.7 without
# (the fastest of 16 candidates).
CONV_FORWARD = dict(BLOCK_T=128, BLOCK_G=8, num_warps=4, LOOP_TAPS=True)
# Launch 1 (and launch 3, on the same tiles). maxnreg: a register cap for ptxas (None: its choice). Launch 1 reads the
# conv's pre-activation that the backward's recomputation stored instead of recomputing the conv (it took 82.8 us at
# 224 px b64 on an H100 with 2 warps and the conv, 255 registers). Without the conv, ptxas (sm_90, bfloat16) gives it
# 128 registers at 4 warps (1,144 SASS instructions; 16 warps per SM) against 255 at 2 warps (1,920; 8 warps per SM):
# 4 warps, chosen by these counts, not timed yet.
CONV_BACKWARD = dict(BLOCK_T=16, BLOCK_G=8, num_warps=4, TILES=8, maxnreg=None)
# TILES: the same tokens per program as CONV_BACKWARD. 2 warps: 97 instead of 102 us with 4 at 224 (with v's weight
# gradient, 89 us before it moved here), timed when the conv weight gradient took a second walk per tap. The single
# walk is not timed yet; its per-tap register tiles take ptxas (sm_90, bfloat16) to 255 registers at 2 warps (12 bytes
# spilled outside the loop) and 128 at 4 warps, no spills. Single walk timed (H100, 224 px b64, 2026-12-07): 8 tokens
# per tile 56.1 us, 16 tokens 61.5 us.
CONV_INPUT_GRAD = dict(BLOCK_T=8, BLOCK_G=8, num_warps=2)
# Gated output: elements of a program's (tokens, head dims) tile, warps, and the token tiles each backward program
# walks.
GATED_OUTPUT = dict(TILE_ELEMENTS=1024, num_warps=2)
BACKWARD_TILES = 8
LAUNCH_TABLES = ('CONV_FORWARD', 'CONV_BACKWARD', 'CONV_INPUT_GRAD', 'GATED_OUTPUT')
LAUNCH_CONFIGS_ENV = 'MMSEG_VIL_MIXER_LAUNCH_CONFIGS'


def load_launch_configs(path: str) -> None:
    """Replace launch tables by those of a JSON file ``{"CONV_FORWARD": {...}, ...}`` (what
    benchmarks/tune_mixer_kernels.py found fastest on a GPU); read at import from ``$MMSEG_VIL_MIXER_LAUNCH_CONFIGS``.
    """
    with open(path) as f:
        try:
            configs = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f'{path} (launch configurations, e.g. from ${LAUNCH_CONFIGS_ENV}) is not JSON: {error}; '
                             'write it with benchmarks/tune_mixer_kernels.py') from error
    unknown = set(configs) - set(LAUNCH_TABLES)
    if unknown:
        raise ValueError(f'{path}: unknown launch tables {sorted(unknown)}; expected some of {list(LAUNCH_TABLES)}')
    for name, config in configs.items():
        if set(config) != set(globals()[name]):
            raise ValueError(f'{path}: {name} needs the keys {sorted(globals()[name])}, got {sorted(config)}')
    globals().update({name: dict(config) for name, config in configs.items()})  # all or nothing


if os.environ.get(LAUNCH_CONFIGS_ENV):
    load_launch_configs(os.environ[LAUNCH_CONFIGS_ENV])


def _accumulator(dtype: torch.dtype) -> Tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _conv_launch(x: Tensor, config: dict, tokens_per_program: int = 0) -> Tuple[tuple, dict]:
    """Grid ``(token ranges, channel tiles, batch)`` and launch options of a conv + q/k/v kernel with ``config``;
    ``tokens_per_program`` (backward launches): each program walks that many tokens in tiles of ``BLOCK_T``."""
    batch, n, chans = x.shape
    block_t = config['BLOCK_T']
    block_g = min(config['BLOCK_G'], triton.next_power_of_2(chans // GROUP))
    options = dict(config, BLOCK_G=block_g, ACC=_accumulator(x.dtype)[1])
    if tokens_per_program:
        options['TILES'] = tokens_per_program // block_t
    grid = (triton.cdiv(n, tokens_per_program or block_t), triton.cdiv(chans // GROUP, block_g), batch)
    return grid, options


def _rows(x: Tensor) -> Tuple[Tensor, int]:
    """``x (B, N, C)`` and the length of its rows, for kernels that read tokens as rows of unit-stride channels: a view
    with longer rows (e.g. one half of the up-projection's output) as it is, any other layout copied."""
    if x.stride(-1) == 1 and x.stride(0) == x.shape[1] * x.stride(1):
        return x, x.stride(1)
    return x.contiguous(), x.shape[-1]


def _num_gates(gate_weight: Optional[Tensor]) -> int:
    return 0 if gate_weight is None else len(gate_weight)


class Projections(NamedTuple):
    """The q/k/v projections' and the gates' parameters as the kernels take them: separate tensors, the modules'
    parameters as they are (no stacked copies per call). Gates: ``gate_weights[0]``'s rows (the input gates') come
    first, then ``gate_weights[1]``'s."""
    weights: Sequence[Tensor]  # q, k, v: (E / 4, 4, 4) each
    biases: Optional[Sequence[Tensor]]  # q, k, v: (E,) each
    gate_weights: Optional[Sequence[Tensor]] = None  # input gates (G_i, 3 E), forget gates (G_f, 3 E)
    gate_biases: Optional[Sequence[Tensor]] = None  # (G_i,), (G_f,)

    @classmethod
    def stacked(cls, qkv_weight: Optional[Tensor], qkv_bias: Optional[Tensor], gate_weight: Optional[Tensor] = None,
                gate_bias: Optional[Tensor] = None) -> 'Projections':
        """From a stacked ``(3, E / 4, 4, 4)`` weight, ``(3, E)`` bias and ``(G, 3 E)`` gate weight, ``(G,)`` bias
        (views, the gates split after ``G // 2`` rows)."""
        def halves(t: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
            return None if t is None else tuple(t.split([len(t) // 2, len(t) - len(t) // 2]))
        return cls(None if qkv_weight is None else qkv_weight.unbind(0),
                   None if qkv_bias is None else qkv_bias.unbind(0), halves(gate_weight), halves(gate_bias))

    @property
    def num_gates(self) -> int:
        return 0 if self.gate_weights is None else sum(len(w) for w in self.gate_weights)

    @property
    def input_gates(self) -> int:
        return 0 if self.gate_weights is None else len(self.gate_weights[0])

    def kernel_args(self) -> list:
        """Pointers in the forward kernel's order: q, k, v weights and biases, input and forget gate weights and
        biases (None where absent)."""
        weights = [None] * 3 if self.weights is None else [w.contiguous() for w in self.weights]
        biases = [None] * 3 if self.biases is None else list(self.biases)
        gates = [None] * 2 if self.gate_weights is None else [w.contiguous() for w in self.gate_weights]
        gate_biases = [None] * 2 if self.gate_biases is None else list(self.gate_biases)
        return weights + biases + gates + gate_biases


def empty_gates(x: Tensor, num_gates: int) -> Tensor:
    """``(B, G, N)`` gate pre-activations in the accumulator dtype (the mLSTM reads gates in float32 or above)."""
    return torch.empty(len(x), num_gates, x.shape[1], dtype=_accumulator(x.dtype)[0], device=x.device)


@custom_op('mmseg_vil::conv_qkv')
def conv_qkv(x: Tensor, height: int, width: int, conv_weight: Tensor, conv_bias: Tensor, qkv_weight: Tensor,
             qkv_bias: Tensor, gate_weight: Optional[Tensor], gate_bias: Optional[Tensor],
             reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton :func:`~.reference.conv_qkv` for ``x (B, N, E)``, ``N = height * width``, and the gate pre-activations
    ``gate_weight (G, 3 E) @ q | k | v + gate_bias`` as ``(B, G, N)`` in the accumulator dtype (``(B, 0, N)`` without
    gate weights)."""
    return conv_forward(x, height, width, conv_weight, conv_bias,
                        Projections.stacked(qkv_weight, qkv_bias, gate_weight, gate_bias), reverse)


def conv_pre_qkv(x: Tensor, height: int, width: int, conv_weight: Tensor, conv_bias: Tensor,
                 projections: Optional[Projections], reverse: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The backward's recomputation of :func:`conv_qkv` without gates: the conv's pre-activation (rounded to x's
    dtype, as the forward rounds it before the SiLU) in place of its SiLU, from which the backward kernels recompute
    the SiLU, and q | k | v (``None`` without ``projections``)."""
    if projections is not None:
        projections = projections._replace(gate_weights=None, gate_biases=None)
    pre, qkv, _ = conv_forward(x, height, width, conv_weight, conv_bias, projections, reverse, store_pre=True)
    return pre, qkv


def conv_forward(x: Tensor, height: int, width: int, conv_weight: Tensor, conv_bias: Tensor,
                 projections: Optional[Projections], reverse: bool,
                 store_pre: bool = False) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """:func:`conv_qkv` with the projections' parameters as separate tensors; ``projections`` None: the conv alone
    (``store_pre``: its pre-activation instead of its SiLU, :func:`conv_pre_qkv`)."""
    project = projections is not None
    projections = projections or Projections(None, None)
    x, x_row = _rows(x)
    x_conv = x.new_empty(x.shape)
    qkv = x.new_empty(*x.shape[:2], 3 * x.shape[2]) if project else None
    (_, channel_tiles, batch), config = _conv_launch(x, CONV_FORWARD)
    grid = (triton.cdiv(batch * x.shape[1], config['BLOCK_T']), channel_tiles)  # tiles of the images' tokens in a row
    num_gates = projections.num_gates
    # (channel tiles, B, G, N): each channel tile's share of the gates
    shares = x.new_empty(channel_tiles if num_gates else 1, len(x), num_gates, x.shape[1],
                         dtype=_accumulator(x.dtype)[0])
    conv_kernels.conv_qkv_forward_kernel[grid](
        x, conv_weight.contiguous(), conv_bias, *projections.kernel_args(), x_conv, qkv, shares, height, width,
        x.shape[2], x_row, batch * x.shape[1], KSIZE=conv_weight.shape[-1], REVERSE=reverse, NUM_GATES=num_gates,
        INPUT_GATES=projections.input_gates, STORE_PRE=store_pre, PROJECT=project, **config)
    return x_conv, qkv, shares.sum(0) if num_gates else shares[0]  # no gates (the recomputation): nothing to sum


@conv_qkv.register_fake
def _(x, height, width, conv_weight, conv_bias, qkv_weight, qkv_bias, gate_weight, gate_bias, reverse):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(*x.shape[:2], 3 * x.shape[2]),
            empty_gates(x, _num_gates(gate_weight)))


def conv_qkv_backward_into(grad_x_conv: Tensor, grad_qkv: Tensor, grad_gates: Tensor, x: Tensor, pre: Tensor,
                           qkv: Tensor, height: int, width: int, conv_weight: Tensor, conv_bias: Tensor,
                           projections: Projections, reverse: bool, grad_x: Tensor,
                           param_grads: Optional[Tensor] = None) -> List[Tensor]:
    """The gradient of ``x`` written into ``grad_x`` (same strides as ``x``, e.g. halves of the up-projection's
    output and of its gradient); returns those of the conv weight and bias, q/k/v weight and bias (stacked ``(3, E /
    4, 4, 4)`` and ``(3, E)``), gate weight and bias (``(G, 3 E)``, ``(G,)``: input gates first) as views of one flat
    buffer in the accumulator's dtype: ``param_grads`` if given (e.g. a slice of the caller's buffer for all its
    parameters), in that order. ``grad_gates (B, G, N)`` of any strides, ``pre`` the conv's pre-activation
    (:func:`conv_pre_qkv`), ``qkv`` the forward's q | k | v (for the gate weight's gradient); ``projections``' biases
    are not read.
    """
    x, x_row = _rows(x)
    if grad_x.stride() != x.stride():
        raise ValueError(f'grad_x strides {grad_x.stride()} differ from those of x {x.stride()}')
    chans, ksize = x.shape[2], conv_weight.shape[-1]
    tokens_per_program = CONV_BACKWARD['BLOCK_T'] * CONV_BACKWARD['TILES']
    grid, config = _conv_launch(x, {k: v for k, v in CONV_BACKWARD.items() if k != 'TILES'}, tokens_per_program)
    gather_grid, gather_config = _conv_launch(x, CONV_INPUT_GRAD, tokens_per_program)
    acc_dtype = _accumulator(x.dtype)[0]
    grad_pre = x.new_empty(x.shape)  # in the activations' dtype, as autograd of the official conv has it
    num_gates = projections.num_gates
    shapes = [conv_weight.shape, conv_bias.shape, (3, *projections.weights[0].shape), (3, chans),
              (num_gates, 3 * chans), (num_gates,)]
    flat, views = _flat_grads(shapes, acc_dtype, x.device, param_grads)
    # One partial row per (token range, image), the same tokens per program (grid[0]) in all three launches, with the
    # columns of the flat gradient buffer: one sum over the rows gives every gradient.
    partial = torch.empty(grid[0] * grid[2], flat.numel(), dtype=acc_dtype, device=x.device)
    q_weight, k_weight, v_weight, *_, igate_weight, fgate_weight, _, _ = projections.kernel_args()
    conv_weight, grad_qkv, qkv = conv_weight.contiguous(), grad_qkv.contiguous(), qkv.contiguous()
    gates = dict(NUM_GATES=num_gates, INPUT_GATES=projections.input_gates, KSIZE=ksize)
    conv_kernels.conv_qkv_backward_kernel[grid](
        pre.contiguous(), q_weight, k_weight, igate_weight, fgate_weight, grad_x_conv.contiguous(), grad_qkv,
        grad_gates, grad_pre, partial, height, width, chans, *grad_gates.stride(), **gates, **config)
    conv_kernels.conv_qkv_input_grad_kernel[gather_grid](
        grad_pre, x, conv_weight, v_weight, igate_weight, fgate_weight, grad_qkv, grad_gates, grad_x, partial, height,
        width, chans, x_row, *grad_gates.stride(), **gates, REVERSE=reverse, **gather_config)
    # launch 1's tiles and warps (its grid, its partial rows), but not its register cap: launch 3 is a small kernel
    conv_kernels.conv_qkv_gate_grad_kernel[grid](
        qkv, grad_gates, partial, height, width, chans, *grad_gates.stride(), NUM_GATES=num_gates, KSIZE=ksize,
        **{k: v for k, v in config.items() if k != 'maxnreg'})
    column_sums(partial, out=flat)
    return views


def _flat_grads(shapes: List[tuple], dtype: torch.dtype, device: torch.device,
                flat: Optional[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    """A flat buffer for gradients of ``shapes`` (``flat`` if given) and its views shaped so, in order."""
    numels = [torch.Size(shape).numel() for shape in shapes]
    flat = torch.empty(sum(numels), dtype=dtype, device=device) if flat is None else flat
    return flat, [g.view(shape) for g, shape in zip(flat.split(numels), shapes)]


def owned_grads(grads: List[Tensor], params: List[Tensor]) -> List[Tensor]:
    """Gradients as separate tensors in their parameters' dtypes (a custom op's outputs may not alias)."""
    return [g.to(p.dtype, copy=True) for g, p in zip(grads, params)]


@custom_op('mmseg_vil::conv_qkv_backward')
def conv_qkv_backward(grad_x_conv: Tensor, grad_qkv: Tensor, grad_gates: Tensor, x: Tensor, qkv: Tensor, height: int,
                      width: int, conv_weight: Tensor, conv_bias: Tensor, qkv_weight: Tensor, gate_weight: Tensor,
                      reverse: bool) -> List[Tensor]:
    """Gradients of x, conv weight, conv bias, q/k/v weight, q/k/v bias, gate weight and gate bias
    (:func:`conv_qkv_backward_into` with a fresh gradient of x)."""
    x = x.contiguous()
    grad_x = torch.empty_like(x)
    pre, _ = conv_pre_qkv(x, height, width, conv_weight, conv_bias, None, reverse)
    grads = conv_qkv_backward_into(grad_x_conv, grad_qkv, grad_gates, x, pre, qkv, height, width, conv_weight,
                                   conv_bias, Projections.stacked(qkv_weight, None, gate_weight), reverse, grad_x)
    qkv_bias_like = conv_bias.new_empty(3, x.shape[2])
    return [grad_x, *owned_grads(grads, [conv_weight, conv_bias, qkv_weight, qkv_bias_like, gate_weight,
                                         gate_weight])]


@conv_qkv_backward.register_fake
def _(grad_x_conv, grad_qkv, grad_gates, x, qkv, height, width, conv_weight, conv_bias, qkv_weight, gate_weight,
      reverse):
    chans = x.shape[2]
    return [torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(conv_weight),
            torch.empty_like(conv_bias), torch.empty_like(qkv_weight), conv_bias.new_empty(3, chans),
            torch.empty_like(gate_weight), gate_weight.new_empty(len(gate_weight))]


def _conv_qkv_setup(ctx, inputs, output) -> None:
    x, height, width, conv_weight, conv_bias, qkv_weight, _, gate_weight, _, reverse = inputs
    ctx.save_for_backward(x, output[1], conv_weight, conv_bias, qkv_weight, gate_weight)
    ctx.grid, ctx.reverse = (height, width), reverse
    ctx.set_materialize_grads(False)


def _conv_qkv_grad(ctx, grad_x_conv, grad_qkv, grad_gates):
    x, qkv, conv_weight, conv_bias, qkv_weight, gate_weight = ctx.saved_tensors
    if gate_weight is None:  # no gates: as with gate weights of zero rows
        gate_weight = conv_weight.new_empty(0, qkv.shape[-1])
    grad_x_conv = torch.zeros_like(x) if grad_x_conv is None else grad_x_conv
    grad_qkv = torch.zeros_like(qkv) if grad_qkv is None else grad_qkv
    grad_gates = empty_gates(x, len(gate_weight)).zero_() if grad_gates is None else grad_gates
    *grads, grad_gate_weight, grad_gate_bias = conv_qkv_backward(
        grad_x_conv, grad_qkv, grad_gates, x, qkv, *ctx.grid, conv_weight, conv_bias, qkv_weight, gate_weight,
        ctx.reverse)
    has_gates = ctx.needs_input_grad[7]
    return (grads[0], None, None, *grads[1:], grad_gate_weight if has_gates else None,
            grad_gate_bias if has_gates else None, None)


conv_qkv.register_autograd(_conv_qkv_grad, setup_context=_conv_qkv_setup)


def _head_parts(head_dim: int) -> Tuple[int, int]:
    """``(BLOCK_D, PARTS)``: a head of 3 * 2^k dims (the ViL heads 96, 192, 384) as three tiles of 2^k, a power-of-two
    head as one tile, any other head dim as one tile padded to the next power of two (masked)."""
    if head_dim % 3 == 0 and triton.next_power_of_2(head_dim // 3) == head_dim // 3:
        return head_dim // 3, 3
    return triton.next_power_of_2(head_dim), 1


def _gate_launch(h: Tensor) -> Tuple[tuple, dict]:
    """Grid ``(token tiles, heads)`` and launch options: tiles of the most tokens (a power of two, at most 32) whose
    head parts hold at most ``TILE_ELEMENTS`` elements."""
    batch, n, heads, head_dim = h.shape
    block_d, parts = _head_parts(head_dim)
    tokens = max(1, GATED_OUTPUT['TILE_ELEMENTS'] // (block_d * parts))
    block_t = min(32, 1 << (tokens.bit_length() - 1))
    grid = (triton.cdiv(batch * n, block_t), heads)
    return grid, dict(BLOCK_T=block_t, BLOCK_D=block_d, PARTS=parts, ACC=_accumulator(h.dtype)[1],
                      num_warps=GATED_OUTPUT['num_warps'])


def _gate_args(h: Tensor, z: Tensor, eps: float) -> tuple:
    """``h`` (unit stride along the head dim), ``z`` (rows as :func:`_rows` gives them), their strides and the
    sizes, and ``eps`` as a one-element tensor in the accumulator's dtype (a float argument would be passed as
    float32)."""
    batch, n, heads, head_dim = h.shape
    if h.stride(-1) != 1:
        h = h.contiguous()
    z, z_row = _rows(z)
    eps = full(1, eps, h, _accumulator(h.dtype)[0])
    return h, z, (h.stride(0), h.stride(1), h.stride(2), n, batch * n, heads * head_dim, z_row, head_dim, eps)


@custom_op('mmseg_vil::gated_output')
def gated_output(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Tensor, skip: Tensor,
                 eps: float) -> Tensor:
    """Triton :func:`~.reference.gated_output` for heads ``h (B, N, NH, DH)`` in any strides."""
    out = x_conv.new_empty(x_conv.shape)
    grid, config = _gate_launch(h)
    h, z, sizes = _gate_args(h, z, eps)
    gate_kernels.gated_output_forward_kernel[grid](
        h, x_conv.contiguous(), z, norm_weight, norm_bias, skip, out, *sizes, **config)
    return out


@gated_output.register_fake
def _(h, x_conv, z, norm_weight, norm_bias, skip, eps):
    return x_conv.new_empty(x_conv.shape)


def gated_output_backward_into(grad_out: Tensor, h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor,
                               norm_bias: Tensor, skip: Tensor, eps: float, grad_h: Tensor, grad_x_conv: Tensor,
                               grad_z: Tensor, out: Optional[Tensor] = None, param_grads: Optional[Tensor] = None,
                               x_conv_from_pre: bool = False) -> List[Tensor]:
    """Gradients of h, x_conv and z written into ``grad_h`` (h's strides), ``grad_x_conv`` (contiguous) and
    ``grad_z`` (z's strides, e.g. halves of the up-projection's output and of its gradient), and the forward's
    output into ``out`` if given (recomputed on the way, for a caller that did not keep it); returns the gradients
    of the norm weight, norm bias and skip as views of one flat buffer in the accumulator's dtype (``param_grads`` if
    given). ``x_conv_from_pre``: ``x_conv`` holds the conv's pre-activation (:func:`conv_pre_qkv`), whose SiLU the
    kernel computes as the conv kernel does."""
    if grad_z.stride() != z.stride() or grad_h.stride() != h.stride() or h.stride(-1) != 1:
        raise ValueError(f'gradient strides {grad_h.stride()}, {grad_z.stride()} differ from those of h and z '
                         f'{h.stride()}, {z.stride()} (or h is not contiguous along its head dim)')
    (token_tiles, heads), config = _gate_launch(h)
    grid = (triton.cdiv(token_tiles, BACKWARD_TILES), heads)
    chans = x_conv.shape[-1]
    partial = torch.empty(grid[0], 3 * chans, dtype=_accumulator(h.dtype)[0], device=h.device)
    h, z, sizes = _gate_args(h, z, eps)
    gate_kernels.gated_output_backward_kernel[grid](
        h, x_conv.contiguous(), z, norm_weight, norm_bias, skip, grad_out.contiguous(), grad_h, grad_x_conv, grad_z,
        partial, out, *sizes, TILES=BACKWARD_TILES, STORE_OUT=out is not None, X_CONV_FROM_PRE=x_conv_from_pre,
        **config)
    flat, views = _flat_grads([(chans,)] * 3, partial.dtype, partial.device, param_grads)
    column_sums(partial, out=flat)
    return views


@custom_op('mmseg_vil::gated_output_backward')
def gated_output_backward(grad_out: Tensor, h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor,
                          norm_bias: Tensor, skip: Tensor, eps: float) -> List[Tensor]:
    """Gradients of h (in h's strides), x_conv, z, norm weight, norm bias and skip
    (:func:`gated_output_backward_into` with fresh buffers)."""
    if h.stride(-1) != 1:
        h = h.contiguous()
    z = z.contiguous()
    grad_h = torch.empty_strided(h.shape, h.stride(), dtype=h.dtype, device=h.device)
    grad_x_conv, grad_z = torch.empty_like(x_conv, memory_format=torch.contiguous_format), torch.empty_like(z)
    grads = gated_output_backward_into(grad_out, h, x_conv, z, norm_weight, norm_bias, skip, eps, grad_h, grad_x_conv,
                                       grad_z)
    return [grad_h, grad_x_conv, grad_z, *owned_grads(grads, [norm_weight, norm_bias, skip])]


@gated_output_backward.register_fake
def _(grad_out, h, x_conv, z, norm_weight, norm_bias, skip, eps):
    h_strides = h.stride() if h.stride(-1) == 1 else h.contiguous().stride()
    return [torch.empty_strided(h.shape, h_strides, dtype=h.dtype, device=h.device),
            torch.empty_like(x_conv, memory_format=torch.contiguous_format),
            torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(norm_weight),
            torch.empty_like(norm_bias), torch.empty_like(skip)]


def _gated_output_setup(ctx, inputs, output) -> None:
    *tensors, eps = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps = eps


def _gated_output_grad(ctx, grad_out):
    return *gated_output_backward(grad_out, *ctx.saved_tensors, ctx.eps), None


gated_output.register_autograd(_gated_output_grad, setup_context=_gated_output_setup)
