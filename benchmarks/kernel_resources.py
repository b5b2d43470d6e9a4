"""Compile the block's Triton kernels for an NVIDIA architecture on a machine without a GPU, and report what each
launch of one ViL block's training step would use: registers, spilled bytes, stack frame, local-memory stores and
loads, shared memory, SASS instructions and how many global loads and stores are vectors. GPU time is scarce; compile
errors, spills and scalar memory access show up here first.

    python benchmarks/kernel_resources.py [--arch 90] [--dtype bfloat16] [--batch 64] [--grid 14 14] [--dims 192]
        [--tokens N] [--cell fused|fused_chunkwise] [--chunk 64] [--cell-only]

``--cell fused_chunkwise`` reports the chunkwise Triton cell's launches (linear in the tokens, e.g. ``--tokens 16384
--batch 2`` for ViL-T at 2048 px) in place of the quadratic ``fused`` ones; ``--cell-only`` leaves out the block's
other kernels. The chunkwise launch options read from the environment (fused_chunkwise/op.py, maxnreg included) apply
here too.

The wrappers run on ``meta`` tensors (shapes only; the custom ops call their functions directly on them); each
kernel launch is caught and compiled ahead of time with the launch's real arguments: the same constexprs, and what
Triton's launcher specialises (integers equal to 1, integers divisible by 16; pointers are taken as 16-byte aligned).
Needs the CUDA toolchain bundled with Triton, not a driver.
"""
import argparse
import io
import math
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager, redirect_stdout
from typing import Iterator, List

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from mmseg_vil.models.layers import norm_ops
from mmseg_vil.models.layers.mixer_ops import triton_ops
from mmseg_vil.models.layers.mlstm import fused
from mmseg_vil.models.layers.mlstm.fused_chunkwise import op as chunkwise_op

_TYPES = {torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float32: 'fp32', torch.float64: 'fp64',
          torch.int32: 'i32', torch.int64: 'i64', torch.bool: 'i1'}
_TOOLS = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')


def _signature(fn: JITFunction, args: tuple, kwargs: dict):
    """Triton signature, constexprs and divisibility attributes of one launch."""
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = values.get(name)
        if index in fn.constexprs:
            signature[name], constexprs[name] = 'constexpr', value
        elif isinstance(value, torch.Tensor):
            signature[name] = '*' + _TYPES[value.dtype]
            attrs[(index,)] = [['tt.divisibility', 16]]
        elif value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1
                               and index not in fn.do_not_specialize):
            signature[name], constexprs[name] = 'constexpr', value  # the launcher specialises None and 1
        elif isinstance(value, bool):
            signature[name] = 'i1'
        elif isinstance(value, int):
            signature[name] = 'i32' if -2**31 <= value < 2**31 else 'i64'
            if value % 16 == 0:
                attrs[(index,)] = [['tt.divisibility', 16]]
        else:
            signature[name] = 'fp32'
    options = {key: kwargs[key] for key in ('num_warps', 'num_stages', 'maxnreg', 'enable_fp_fusion') if key in kwargs}
    return signature, constexprs, attrs, options


def _compile(fn: JITFunction, signature: dict, constexprs: dict, attrs: dict, options: dict, arch: int):
    """Compile bypassing Triton's cache, so that ptxas runs and its log (the only source of spill bytes: the cubin's
    ``STACK`` also holds local arrays, and its ``LOCAL`` is only the ``.local`` segment) can be caught from stdout."""
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget('cuda', arch, 32), options=options)
    return kernel, log.getvalue()


def _report(fn: JITFunction, args: tuple, kwargs: dict, arch: int, grid: tuple = ()) -> str:
    signature, constexprs, attrs, options = _signature(fn, args, kwargs)
    kernel, log = _compile(fn, signature, constexprs, attrs, options, arch)
    with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
        cubin.write(kernel.asm['cubin'])
        cubin.flush()
        usage = subprocess.run([os.path.join(_TOOLS, 'cuobjdump'), '-res-usage', cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_TOOLS, 'cuobjdump'), '-sass', cubin.name], capture_output=True,
                              text=True, check=True).stdout
    resources = dict(re.findall(r'(REG|STACK|SHARED):(\d+)', usage))
    spill = max(map(int, re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log).groups()))
    local_stores, local_loads = (len(re.findall(rf'\b{op}\b', sass)) for op in ('STL', 'LDL'))  # in code, not run
    ptx = kernel.asm['ptx']
    vector_loads, loads = (len(re.findall(pattern, ptx)) for pattern in (r'ld\.global\S*\.v\d', r'ld\.global'))
    vector_stores, stores = (len(re.findall(pattern, ptx)) for pattern in (r'st\.global\S*\.v\d', r'st\.global'))
    blocks = {key: value for key, value in constexprs.items() if key.startswith('BLOCK') or key == 'TILES'}
    instructions = len(re.findall(r'^ +/\*[0-9a-f]{4,}\*/', sass, re.M))
    warps = options.get('num_warps', 4)
    shared = kernel.metadata.shared  # Triton's dynamic shared memory (cuobjdump's SHARED is the static part only)
    resident = _programs_per_sm(int(resources.get('REG', 0)), warps, shared)
    return (f'{fn.__name__:34s} regs {resources.get("REG", "?"):>3s}  spill {spill:4d} B  '
            f'stack {resources.get("STACK", "?"):>4s} B  local stores/loads {local_stores}/{local_loads}  '
            f'shared {resources.get("SHARED", "?"):>5s}+{shared:<6d}B  sass {instructions:5d}'
            f'  vector loads {vector_loads}/{loads}  stores {vector_stores}/{stores}  {blocks} warps '
            f'{warps}  programs/SM {resident}' + (f'  grid {tuple(grid)}' if grid else ''))


def _programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """Programs resident per SM of an H100/H200 (sm_90: 64K registers allocated per warp in units of 256, 64
    warps, 32 blocks, 227 KiB of shared memory plus 1 KiB reserved per block): the occupancy limit of one launch."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = [65536 // (regs_per_warp * warps), 64 // warps, 32]
    if shared:
        limits.append(233472 // (shared + 1024))
    return min(limits)


@contextmanager
def _compile_launches(arch: int, lines: List[str]) -> Iterator[None]:
    """Replace kernel launches by ahead-of-time compiles whose reports go to ``lines``."""
    launch = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        lines.append(_report(self, args, kwargs, arch, grid if isinstance(grid, tuple) else ()))

    JITFunction.run = compile_instead
    try:
        yield
    finally:
        JITFunction.run = launch


def block_kernels(arch: int, dtype: torch.dtype, batch: int, grid: tuple, dims: int, heads: int = 4,
                  cell: str = 'fused', chunk: int = 64, cell_only: bool = False) -> List[str]:
    """Reports of every kernel launch of one ViL block's forward and backward (the released models' options), with
    the cell's launches those of ``cell``: 'fused' (quadratic tiles) or 'fused_chunkwise' (chunks of ``chunk``
    steps, as the mixer runs them: q, k, v head views of one projection, gradients into one buffer); ``cell_only``:
    the cell's launches alone."""
    inner, n = 2 * dims, grid[0] * grid[1]

    def empty(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device='meta')

    x, qkv_weight, biases = empty(batch, n, inner), empty(3, inner // 4, 4, 4, dtype=torch.float32), empty(
        3, inner, dtype=torch.float32)
    conv_weight, conv_bias = empty(inner, 1, 3, 3, dtype=torch.float32), empty(inner, dtype=torch.float32)
    heads_view = empty(batch, n, heads, inner // heads).transpose(1, 2)  # (B, NH, N, DH) views, as the mixer's
    norm = [empty(inner, dtype=torch.float32) for _ in range(3)]
    lines: List[str] = []
    with _compile_launches(arch, lines):
        if cell_only:
            cell_kernels(cell, chunk, batch, n, inner, heads, dtype)
            return lines
        gate_weight, gate_bias = empty(2 * heads, 3 * inner, dtype=torch.float32), empty(2 * heads, dtype=torch.float32)
        x_mlstm, z = empty(batch, n, 2 * inner).chunk(2, dim=-1)  # as mixer_core reads them: halves of one output
        triton_ops.conv_qkv(x_mlstm, *grid, conv_weight, conv_bias, qkv_weight, biases, gate_weight, gate_bias,
                            False)
        projections = triton_ops.Projections.stacked(qkv_weight, biases, gate_weight, gate_bias)
        pre, qkv = triton_ops.conv_pre_qkv(x_mlstm, *grid, conv_weight, conv_bias, projections, False)
        triton_ops.conv_qkv_backward_into(x, qkv, empty(batch, 2 * heads, n, dtype=torch.float32), x_mlstm, pre, qkv,
                                          *grid, conv_weight, conv_bias, projections, False, x_mlstm)
        h = heads_view.transpose(1, 2)
        triton_ops.gated_output(h, x, z, *norm, 1e-5)
        triton_ops.gated_output_backward_into(x, h, pre, z, *norm, 1e-5, h, x, z, x, x_conv_from_pre=True)
        cell_kernels(cell, chunk, batch, n, inner, heads, dtype)
        # the block's norm with the previous block's residual add (float32 stream, 16-bit update and output), and its
        # backward with the stream's gradient added and the update's written
        stream, stats = empty(batch, n, dims, dtype=torch.float32), empty(batch * n, dtype=torch.float32)
        norm_params = [empty(dims, dtype=torch.float32) for _ in range(2)]
        norm_ops.ops._forward(stream, empty(batch, n, dims), *norm_params, 1e-5, dtype)
        norm_ops.ops._backward_kernel(empty(batch, n, dims), stream, norm_params[0], stats, stats, stream,
                                      empty(batch, n, dims))
    return lines


def cell_kernels(cell: str, chunk: int, batch: int, n: int, inner: int, heads: int, dtype: torch.dtype) -> None:
    """Launch the cell's forward and backward on ``meta`` tensors laid out as the mixer's (mixer_core.py)."""
    def empty(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device='meta')

    qkv = empty(batch, n, 3 * inner)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    gates = empty(batch, 2 * heads, n).chunk(2, dim=1)
    if cell == 'fused':
        x = empty(batch, n, inner)
        stats = fused.fused_forward(q, k, v, *gates, 1e-6, False)
        fused.fused_backward(x.view(batch, n, heads, -1), q, k, v, stats[0], *gates, *stats[1:], 1e-6, False)
        return
    h, *stats = chunkwise_op.forward_kernels(q, k, v, *gates, 1e-6, chunk, False)
    grad_qkv, grad_gates = torch.empty_like(qkv), empty(batch, 2 * heads, n)
    chunkwise_op.backward_kernels_into(torch.empty_like(h), q, k, v, *gates, h, stats, 1e-6, chunk, False,
                                       *(t.unflatten(-1, (heads, -1)) for t in grad_qkv.chunk(3, dim=-1)),
                                       *(g.transpose(1, 2) for g in grad_gates.chunk(2, dim=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', type=int, default=90, help='compute capability, e.g. 90 (H100/H200), 80 (A100)')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--grid', type=int, nargs=2, default=(14, 14), help='token grid (224 px, patch 16: 14 14)')
    parser.add_argument('--dims', type=int, default=192, help='embedding width (ViL-T 192, ViL-S 384, ViL-B 768)')
    parser.add_argument('--tokens', type=int, help='tokens instead of --grid: a square grid if N is a square, else '
                        '1 x N (ViL-T at 2048 px: 16384)')
    parser.add_argument('--cell', default='fused', choices=['fused', 'fused_chunkwise'],
                        help="the mLSTM cell's kernels: quadratic tiles or chunkwise")
    parser.add_argument('--chunk', type=int, default=64, help='steps per chunk of --cell fused_chunkwise')
    parser.add_argument('--cell-only', action='store_true', help="only the cell's launches")
    args = parser.parse_args()
    grid = tuple(args.grid)
    if args.tokens:
        side = math.isqrt(args.tokens)
        grid = (side, side) if side * side == args.tokens else (1, args.tokens)
    print(f'triton {triton.__version__}, sm_{args.arch}, {args.dtype}, batch {args.batch}, grid {grid}, '
          f'dims {args.dims}, cell {args.cell}' + (f' chunk {args.chunk}' if args.cell == 'fused_chunkwise' else ''))
    for line in block_kernels(args.arch, getattr(torch, args.dtype), args.batch, grid, args.dims, cell=args.cell,
                              chunk=args.chunk, cell_only=args.cell_only):
        print(line)


if __name__ == '__main__':
    main()
