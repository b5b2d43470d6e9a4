"""Check and time the fused mLSTM Triton kernels on a CUDA GPU (issues 6, 10); notes: benchmarks/mlstm_kernel_notes.md.

1. Correctness: fused output and gradients against the chunkwise backend in float64 (exact to ~1e-13, see
   tests/test_mlstm_backends.py) for the ViL head dims 96/192/384 (T/S/B) at several N, in float32 and bfloat16;
   some reversed on q/k/v/gates read as strided views of projection outputs, and one float64 case.
   The same for fused_chunkwise, in both directions (reverse=True against the flipped reference), plus q/k/v/gates
   read as strided views of projection outputs and one float64 case.
2. Timing (median ms): forward and forward+backward of the fused, parallel and chunkwise backends, with torch SDPA
   (causal attention of the same shape) as a yardstick, launched eagerly (triton's do_bench; what training sees) and
   replayed from a CUDA graph (do_bench_cudagraph; GPU time without the host's launch overhead); peak memory.
3. The chunkwise Triton kernels against the others: CUDA-graph forward+backward of fused_chunkwise (chunk sizes
   32/64), fused, chunkwise and SDPA at B=1, NH=4, DH=96, N = 196..16384, and the ViL-T shapes; a compact
   table at the end. fused_chunkwise (refused on CUDA until validated here) runs in child processes, one per case.
4. ``--sweep``: CUDA-graph forward+backward time of candidate tile configurations per head dim.
5. ``--vil-shapes`` (alone): forward and forward+backward of the fused backend at ViL's training shapes.
6. ``--targets`` (alone): issue 10's two cell targets, the chunkwise kernels against SDPA at B=1 N=4096 and at
   ViL-T's 2048 px shape (B=2 N=16384), CUDA-graph forward+backward (seconds).
7. ``--chunkwise-sweep`` (alone): launch options of the chunkwise kernels (fused_chunkwise/op.py's
   MMSEG_VIL_CHUNKWISE_LAUNCH; CHUNKWISE_LAUNCHES, or ``--launch SPEC`` repeated; at each ``--sweep-chunks`` size,
   default 64), each in its own process: its worst error at N=4096, CUDA-graph forward and forward+backward ms at
   SWEEP_SHAPES against SDPA, and each kernel's GPU time per forward+backward at the first shape (torch profiler).

Usage, from the repo root on a CUDA machine: ``python benchmarks/mlstm_kernel_check.py --out DIR [--sweep]``;
``--quick`` runs a subset of 1 and only 3 in bfloat16 (a few minutes, most of it compiling kernels).
"""
import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from mmseg_vil.models.layers.mlstm import fused, mlstm_chunkwise, mlstm_fused, mlstm_parallel
from mmseg_vil.models.layers.mlstm.fused_chunkwise.op import mlstm_fused_chunkwise_kernels

GATES = ('igate', 'fgate')
GRAD_NAMES = ('dq', 'dk', 'dv', 'digate', 'dfgate')


def make_inputs(batch, heads, n, head_dim, dtype, seed=0):
    """ViL-like gates (forget +3..+6, 10% strongly negative; input ~N(0,1)), as in the tests; on the GPU."""
    gen = torch.Generator(device='cuda').manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen, device='cuda') for _ in range(3))
    igate = torch.randn(batch, heads, n, generator=gen, device='cuda')
    fgate = 3 + 3 * torch.rand(batch, heads, n, generator=gen, device='cuda')
    strongly_negative = torch.rand(batch, heads, n, generator=gen, device='cuda') < 0.1
    fgate = torch.where(strongly_negative, -4 + torch.randn_like(fgate), fgate)
    return [x.to(dtype) for x in (q, k, v, igate, fgate)]


def flipped(op):
    """``op`` run on the token-reversed sequence and flipped back: the reference of ``reverse=True``."""
    def reversed_op(q, k, v, igate, fgate):
        return op(q.flip(2), k.flip(2), v.flip(2), igate.flip(-1), fgate.flip(-1)).flip(2)
    return reversed_op


def projection_views(inputs):
    """The same values as views of one (B, N, 3 NH DH) projection and one (B, N, 2 NH) gate tensor (ViL's layout)."""
    q, k, v, igate, fgate = (x.detach() for x in inputs)
    heads, head_dim = q.shape[1], q.shape[-1]
    projection = torch.cat([x.transpose(1, 2).flatten(2) for x in (q, k, v)], -1).requires_grad_()
    gates = torch.cat([igate.transpose(1, 2), fgate.transpose(1, 2)], -1).requires_grad_()
    views = [x.unflatten(-1, (heads, head_dim)).transpose(1, 2) for x in projection.chunk(3, -1)]
    return [*views, *gates.transpose(1, 2).chunk(2, dim=1)], [projection, gates]


def relative_errors(n, head_dim, dtype, op=None, reverse=False, strided=False):
    """Max errors as in the tests: relative to max(|ref|, 1e-2 x the largest reference gradient). ``op`` defaults
    to the fused backend; ``reverse`` compares with the flipped reference; ``strided`` passes projection views."""
    op = op or mlstm_fused
    inputs = make_inputs(1, 2, n, head_dim, dtype)
    grad_h = torch.randn(1, 2, n, head_dim, device='cuda').to(dtype)
    ref_inputs = [x.double().requires_grad_() for x in inputs]
    expected = (flipped(mlstm_chunkwise) if reverse else mlstm_chunkwise)(*ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs, grad_h.double())
    if strided:
        views, leaves = projection_views(inputs)
        actual = op(*views)
        grad_projection, grad_gates = torch.autograd.grad(actual, leaves, grad_h)
        actual_grads = [*(g.unflatten(-1, (2, head_dim)).transpose(1, 2) for g in grad_projection.chunk(3, -1)),
                        *grad_gates.transpose(1, 2).chunk(2, dim=1)]
    else:
        inputs = [x.requires_grad_() for x in inputs]
        actual = op(*inputs)
        actual_grads = torch.autograd.grad(actual, inputs, grad_h)
    grad_scale = max(g.abs().max().item() for g in expected_grads)
    errors = {}
    for name, a, e in zip(('h',) + GRAD_NAMES, (actual, *actual_grads), (expected, *expected_grads)):
        floor = 1e-2 * (e.abs().max().item() if name == 'h' else grad_scale)
        errors[name] = (a.double() - e).abs().max().item() / max(e.abs().max().item(), floor)
    return errors


def sdpa(q, k, v, igate, fgate):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


BACKENDS = {'fused': mlstm_fused, 'parallel': mlstm_parallel, 'chunkwise': mlstm_chunkwise, 'sdpa (yardstick)': sdpa}


def time_backend(op, batch, heads, n, head_dim, dtype, graph_only=False):
    """Median ms of eager forward (no grad), eager forward+backward and graph-replayed forward+backward, and the
    peak extra memory of forward+backward in MiB."""
    inputs = [x.requires_grad_() for x in make_inputs(batch, heads, n, head_dim, dtype)]
    grad_h = torch.randn(batch, heads, n, head_dim, device='cuda', dtype=dtype)

    def forward():
        with torch.no_grad():
            op(*inputs)

    def forward_backward():
        torch.autograd.grad(op(*inputs), inputs, grad_h, allow_unused=True)

    try:
        graph_ms = do_bench_cudagraph(forward_backward, rep=100, return_mode='median')
    except Exception:  # noqa: BLE001 - a backend that cannot be captured still gets its eager numbers
        if graph_only:
            raise
        graph_ms = float('nan')
    if graph_only:
        return graph_ms
    forward_ms = do_bench(forward, warmup=25, rep=200, return_mode='median')
    total_ms = do_bench(forward_backward, warmup=25, rep=200, return_mode='median')
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return forward_ms, total_ms, graph_ms, peak_mib


# fused correctness: (head dim, N, dtype, reverse, strided); reversed on the mixer's strided views as ViL's odd blocks
# run it (native reverse, no copies), and one float64 case.
FUSED_CHECKS = [(head_dim, n, dtype, False, False) for head_dim in (96, 192, 384) for n in (196, 1000, 4096)
                for dtype in (torch.float32, torch.bfloat16)] + [(96, 200, torch.float16, False, False)] + [
    (96, 196, torch.bfloat16, True, True), (384, 1000, torch.bfloat16, True, True),
    (96, 1000, torch.float32, True, True), (96, 200, torch.float64, True, True)]


def check(out_lines, results):
    out_lines.append('## correctness: fused vs chunkwise float64 (max relative error)')
    for head_dim, n, dtype, reverse, strided in FUSED_CHECKS:
        name = f'DH={head_dim:3d} N={n:5d} {str(dtype)[6:]:9s}' + (' reverse' if reverse else '') + (
            ' strided' if strided else '')
        try:
            errors = relative_errors(n, head_dim, dtype, functools.partial(mlstm_fused, reverse=reverse), reverse,
                                     strided)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
            out_lines.append(f'{name} failed: {exc!r}'[:300])
            continue
        results.append(dict(kind='check', n=n, head_dim=head_dim, dtype=str(dtype), reverse=reverse, strided=strided,
                            **errors))
        out_lines.append(f'{name} ' + ' '.join(f'{k}={v:.1e}' for k, v in errors.items()))


TIMING_SHAPES = [  # name, B, NH, N, DH
    ('ViL-T 224px', 64, 4, 196, 96),
    ('ViL-T 512px', 8, 4, 1024, 96),
    ('ViL-S 224px', 64, 4, 196, 192),
    ('ViL-B 224px', 64, 4, 196, 384),
    ('long', 1, 4, 16384, 96),
]


def timing(out_lines, results, dtype):
    out_lines.append(f'## timing {str(dtype)[6:]}: median ms eager forward | eager fwd+bwd | graph fwd+bwd | '
                     'peak MiB of fwd+bwd')
    for name, batch, heads, n, head_dim in TIMING_SHAPES:
        for backend, op in BACKENDS.items():
            if backend == 'parallel' and n > 4096:
                continue  # N^2 memory
            try:
                fwd, total, graph, mib = time_backend(op, batch, heads, n, head_dim, dtype)
            except Exception as exc:  # noqa: BLE001 - report e.g. out-of-memory and go on
                out_lines.append(f'{name} B={batch} N={n} DH={head_dim} {backend} failed: {exc}'[:200])
                torch.cuda.empty_cache()
                continue
            results.append(dict(kind='time', shape=name, batch=batch, heads=heads, n=n, head_dim=head_dim,
                                dtype=str(dtype), backend=backend, forward_ms=fwd, forward_backward_ms=total,
                                graph_forward_backward_ms=graph, peak_mib=mib))
            out_lines.append(f'{name:12s} B={batch} NH={heads} N={n} DH={head_dim} {backend:17s} '
                             f'{fwd:8.3f} | {total:8.3f} | {graph:8.3f} | {mib:8.0f}')


# The chunkwise kernels are refused on CUDA until this script validates them (RESULTS.md, 2026-12-04: an illegal memory
# access), so it runs them without the refusal, and every case in its own process: a fault then ends only that case,
# and the checks run with CUDA_LAUNCH_BLOCKING=1 so that the traceback names the faulting kernel launch.
CHUNKWISE_BACKENDS = {
    'fused_chunkwise': mlstm_fused_chunkwise_kernels,
    'fused_chunkwise reverse': functools.partial(mlstm_fused_chunkwise_kernels, reverse=True),
    'fused_chunkwise chunk 32': functools.partial(mlstm_fused_chunkwise_kernels, chunk_size=32),
}
# fused_chunkwise correctness: (head dim, N, dtype, reverse, strided); --quick runs the first QUICK_CHECKS.
CHUNKWISE_CHECKS = [
    (96, 196, 'bfloat16', False, False), (96, 4096, 'bfloat16', True, False), (384, 1000, 'bfloat16', True, False),
    (96, 1000, 'bfloat16', True, True), (96, 1000, 'float32', False, False), (96, 200, 'float64', True, False),
] + [(head_dim, n, dtype, reverse, False) for head_dim in (96, 192, 384) for n in (196, 1000, 4096)
     for dtype in ('bfloat16', 'float32') for reverse in (False, True)]
QUICK_CHECKS = 6
# What the tests allow (3xTF32 float32 sums over thousands of steps get a little more than float32's 1e-4).
CHECK_TOLERANCES = {'bfloat16': 3e-2, 'float16': 3e-2, 'float32': 1e-3, 'float64': 1e-10}


def run_child(child_args, env=None, timeout=600):
    """Run this script with ``--child ...``; returns the JSON results it printed (one per line, prefixed RESULT),
    and, where it failed, the command and the end of its output."""
    command = [sys.executable, os.path.abspath(__file__), '--child', *map(str, child_args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return [], f'timed out after {timeout} s: {" ".join(command)}'
    results = [json.loads(line[len('RESULT '):]) for line in done.stdout.splitlines() if line.startswith('RESULT ')]
    failure = None
    if done.returncode != 0:
        failure = f'exit {done.returncode}: {" ".join(command)}\n' + (done.stdout + done.stderr)[-3000:]
    return results, failure


def child_check(head_dim, n, dtype, reverse, strided):
    op = functools.partial(mlstm_fused_chunkwise_kernels, reverse=reverse == 'True')
    errors = relative_errors(int(n), int(head_dim), getattr(torch, dtype), op, reverse == 'True', strided == 'True')
    print('RESULT ' + json.dumps(errors), flush=True)


def check_chunkwise(out_lines, results, summary, quick):
    out_lines.append('## correctness: fused_chunkwise vs chunkwise float64 (max relative error), one process each')
    for case in CHUNKWISE_CHECKS[:QUICK_CHECKS] if quick else CHUNKWISE_CHECKS:
        head_dim, n, dtype, reverse, strided = case
        name = f'DH={head_dim:3d} N={n:5d} {dtype:8s} {"reverse" if reverse else "forward"}' + (
            ' strided' if strided else '')
        child_results, failure = run_child(('check', *case), env={'CUDA_LAUNCH_BLOCKING': '1'})
        if not child_results:
            out_lines.append(f'{name} FAILED: {failure}')
            summary.append(f'check {name}: FAILED (see above)')
            continue
        errors = child_results[0]
        worst = max(errors.values())
        verdict = 'ok' if worst <= CHECK_TOLERANCES[dtype] else 'OVER TOLERANCE'
        results.append(dict(kind='check_chunkwise', n=n, head_dim=head_dim, dtype=dtype, reverse=reverse,
                            strided=strided, **errors))
        out_lines.append(f'{name} ' + ' '.join(f'{k}={v:.1e}' for k, v in errors.items()) + f' {verdict}')
        summary.append(f'check {name}: worst {worst:.1e} {verdict}')


GRAPH_SHAPES = [  # name, B, NH, N, DH
    ('B=1 N=196', 1, 4, 196, 96), ('B=1 N=1024', 1, 4, 1024, 96), ('B=1 N=4096', 1, 4, 4096, 96),
    ('B=1 N=16384', 1, 4, 16384, 96), ('ViL-T 224 B=64', 64, 4, 196, 96), ('ViL-T 512 B=8', 8, 4, 1024, 96),
]
GRAPH_BACKENDS = {'fused': mlstm_fused, 'chunkwise': mlstm_chunkwise, 'sdpa causal': sdpa}
QUICK_CHUNKWISE_BACKENDS = ('fused_chunkwise', 'fused_chunkwise reverse')


def graph_times(op, dtype):
    """{shape: CUDA-graph forward+backward median ms, or the error} for every GRAPH_SHAPES entry."""
    times = {}
    for shape, batch, heads, n, head_dim in GRAPH_SHAPES:
        try:
            times[shape] = time_backend(op, batch, heads, n, head_dim, dtype, graph_only=True)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory or a compile failure: report and go on
            times[shape] = repr(exc)[:300]
            torch.cuda.empty_cache()
    return times


def child_graph(backend, dtype):
    print('RESULT ' + json.dumps(graph_times(CHUNKWISE_BACKENDS[backend], getattr(torch, dtype))), flush=True)


def graph_timing(out_lines, results, summary, dtype, quick):
    """CUDA-graph forward+backward median ms of the chunkwise kernels against the others, as a compact table."""
    name = str(dtype)[6:]
    out_lines.append(f'## CUDA-graph forward+backward, median ms, {name}, DH=96')
    columns = {backend: graph_times(op, dtype) for backend, op in GRAPH_BACKENDS.items()}
    for backend in QUICK_CHUNKWISE_BACKENDS if quick else CHUNKWISE_BACKENDS:
        child_results, failure = run_child(('graph', backend, name))
        columns[backend] = child_results[0] if child_results else {}
        if failure:
            out_lines.append(f'{backend} FAILED: {failure}')
    table = [f'{"shape":16s}' + ''.join(f'{backend[:26]:>27s}' for backend in columns)]
    for shape, batch, heads, n, head_dim in GRAPH_SHAPES:
        row = f'{shape:16s}'
        for backend, times in columns.items():
            value = times.get(shape, 'no result')
            if isinstance(value, float):
                results.append(dict(kind='graph', shape=shape, batch=batch, heads=heads, n=n, head_dim=head_dim,
                                    dtype=str(dtype), backend=backend, graph_forward_backward_ms=value))
                row += f'{value:27.3f}'
            else:
                out_lines.append(f'{shape} {backend} failed: {value}')
                row += f'{"failed":>27s}'
        table.append(row)
    out_lines.extend(table)
    summary.append(f'CUDA-graph forward+backward ms, {name}, DH=96, NH=4:')
    summary.extend(table)


def profile_training(op, batch, heads, n, head_dim, dtype, warmup, iterations):
    """The torch profiler (CUDA activity) over ``iterations`` forward+backward calls of ``op``, after ``warmup``."""
    inputs = [x.requires_grad_() for x in make_inputs(batch, heads, n, head_dim, dtype)]
    grad_h = torch.randn(batch, heads, n, head_dim, device='cuda', dtype=dtype)
    for _ in range(warmup):
        torch.autograd.grad(op(*inputs), inputs, grad_h)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            torch.autograd.grad(op(*inputs), inputs, grad_h)
        torch.cuda.synchronize()
    return prof


def profile_fused(out_lines, batch=64, heads=4, n=196, head_dim=96, dtype=torch.bfloat16):
    """Where the fused forward+backward spends GPU time at the ViL-T 224px shape (kernels vs small torch ops)."""
    prof = profile_training(mlstm_fused, batch, heads, n, head_dim, dtype, warmup=3, iterations=10)
    out_lines.append(f'## profile of 10 fused forward+backward, B={batch} NH={heads} N={n} DH={head_dim} {dtype}')
    out_lines.append(prof.key_averages().table(sort_by='cuda_time_total', row_limit=25, max_name_column_width=60))


SWEEP = [  # (BLOCK_OWN, BLOCK_LOOP, BLOCK_DK, BLOCK_DZ, num_warps, num_stages, FUSE_DK_DV) for all tile launches
    # DK and DZ are the largest head-dim chunks: 128 splits DH 96 as 64 + 32 (fused._head_split), 32 as 3 x 32.
    # FUSE_DK_DV: dk and dv in one launch where the head is one chunk and a tail (not DH 384: two launches there).
    (64, 32, 128, 128, 4, 2, True), (64, 32, 128, 128, 4, 2, False), (64, 32, 128, 128, 8, 2, True),
    (64, 32, 128, 128, 4, 3, True), (64, 16, 128, 128, 4, 2, True), (64, 64, 128, 128, 8, 2, True),
    (128, 32, 128, 128, 8, 2, True), (128, 64, 128, 128, 8, 2, True), (64, 32, 32, 128, 4, 2, False),
]


def sweep(out_lines, results, dtype):
    out_lines.append(f'## tile sweep {str(dtype)[6:]}: OWN LOOP DK DZ warps stages fuse_dk_dv -> graph fwd+bwd ms')
    default_config = fused._launch_config
    try:
        for head_dim, shapes in ((96, [(64, 196), (8, 1024)]), (384, [(64, 196)])):
            for own, loop, dk, dz, warps, stages, fuse in SWEEP:
                config = dict(BLOCK_OWN=own, BLOCK_LOOP=loop, BLOCK_DK=dk, BLOCK_DZ=dz, FUSE_DK_DV=fuse,
                              num_warps=warps, num_stages=stages)
                fused._launch_config = lambda *_, config=config: config
                for batch, n in shapes:
                    try:
                        graph = time_backend(mlstm_fused, batch, 4, n, head_dim, dtype, graph_only=True)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report and go on
                        out_lines.append(f'DH={head_dim} B={batch} N={n} {config} failed: {exc}'[:200])
                        continue
                    results.append(dict(kind='sweep', head_dim=head_dim, batch=batch, n=n, dtype=str(dtype),
                                        graph_forward_backward_ms=graph, **config))
                    out_lines.append(f'DH={head_dim} B={batch:2d} N={n:4d} {own:3d} {loop:3d} {dk:3d} {dz:3d} {warps} '
                                     f'{stages} {fuse:d} -> {graph:7.3f}')
    finally:
        fused._launch_config = default_config


VIL_SHAPES = [(64, 196, 96), (32, 1024, 96), (8, 4096, 96), (64, 196, 384)]  # (B, N, DH): ViL-T 224/512/1024, ViL-B


def vil_shapes(out_lines):
    """CUDA-graph forward and forward+backward ms of the fused backend at ViL's training shapes (bf16, 4 heads): a
    few seconds per shape, for A/B runs of two trees on one machine (run_gpu_suite.sh's part ``base``)."""
    out_lines.append('## fused at ViL shapes, bf16, 4 heads: CUDA-graph forward / forward+backward ms')
    for batch, n, head_dim in VIL_SHAPES:
        inputs = make_inputs(batch, 4, n, head_dim, torch.bfloat16)

        def forward():
            with torch.no_grad():
                mlstm_fused(*inputs)

        forward_ms = do_bench_cudagraph(forward, rep=100, return_mode='median')
        total_ms = time_backend(mlstm_fused, batch, 4, n, head_dim, torch.bfloat16, graph_only=True)
        out_lines.append(f'B={batch:2d} N={n:4d} DH={head_dim}: {forward_ms:.4f} / {total_ms:.4f}')


SWEEP_SHAPES = [('ViL-T 2048px B=2 N=16384', 2, 4, 16384, 96), ('B=1 N=4096', 1, 4, 4096, 96)]  # name, B, NH, N, DH
# Launch options of the chunkwise kernels (op.LAUNCH_ENV), '' = the defaults. Warps, stages, maxnreg and SPLIT_DK_DV
# keep the results bit for bit; STATE_BLOCK, BLOCK_D, WITH_DQ and the backward scan's BLOCK_E reorder some sums (within
# the tests' tolerances).
# The ptxas figures (benchmarks/kernel_resources.py --cell fused_chunkwise --tokens 16384 --batch 2 --cell-only) say
# which fit 2 or 3 programs per SM.
CHUNKWISE_LAUNCHES = [  # the eighth session's measurements of earlier candidates: benchmarks/RESULTS.md
    '', 'grad_key:num_stages=2', 'scan+grad_scan:BLOCK_E=128,num_warps=1', 'scan+grad_scan:BLOCK_E=256,num_warps=2',
    'scan+grad_scan:STAGES=8', 'grad_query:num_warps=4', 'grad_key:SPLIT_DK_DV=0', 'output+grad_query:STATE_BLOCK=128',
    'summary+grad_summary:num_warps=8',
]


def kernel_times(op, batch, heads, n, head_dim, dtype, iterations=5):
    """{kernel name: GPU us per forward+backward} from the torch profiler (kernels of several launches summed)."""
    prof = profile_training(op, batch, heads, n, head_dim, dtype, warmup=2, iterations=iterations)
    times = {}
    for event in prof.key_averages():
        total = getattr(event, 'device_time_total', None) or getattr(event, 'cuda_time_total', 0)
        if total and event.key.startswith('mlstm_chunk'):
            times[event.key] = total / iterations
    return times


def graph_times(op, batch, heads, n, head_dim, dtype):
    """CUDA-graph ms of ``op``'s forward (no autograd) and of its forward + backward, median."""
    inputs = make_inputs(batch, heads, n, head_dim, dtype)

    def forward():
        with torch.no_grad():
            op(*inputs)

    return (do_bench_cudagraph(forward, rep=100, return_mode='median'),
            time_backend(op, batch, heads, n, head_dim, dtype, graph_only=True))


def child_sweep(chunk_size='64'):
    """One launch option (from the environment): error, CUDA-graph times and per-kernel times."""
    op, dtype = functools.partial(mlstm_fused_chunkwise_kernels, chunk_size=int(chunk_size)), torch.bfloat16
    result = {'worst_error': max(relative_errors(4096, 96, dtype, op).values())}
    for name, *shape in SWEEP_SHAPES:
        result[name] = graph_times(op, *shape, dtype)
    result['kernels_us'] = kernel_times(op, *SWEEP_SHAPES[0][1:], dtype)
    print('RESULT ' + json.dumps(result), flush=True)


def chunkwise_sweep(launches, chunk_sizes=(64,)):
    """CUDA-graph forward / forward+backward ms of the chunkwise kernels per launch option, against SDPA; each line
    printed as soon as it is known, so that a run cut off by its time limit still reports the options it timed."""
    dtype = torch.bfloat16
    print('## chunkwise launch options (MMSEG_VIL_CHUNKWISE_LAUNCH), bf16: CUDA-graph forward / forward+backward ms, '
          'and / SDPA', flush=True)
    sdpa_ms = {}
    for name, *shape in SWEEP_SHAPES:
        sdpa_ms[name] = graph_times(sdpa, *shape, dtype)
        print(f'SDPA causal {name}: {sdpa_ms[name][0]:.3f} / {sdpa_ms[name][1]:.3f}', flush=True)
    for chunk_size, spec in ((chunk_size, spec) for chunk_size in chunk_sizes for spec in launches):
        child_results, failure = run_child(('sweep', chunk_size), env={'MMSEG_VIL_CHUNKWISE_LAUNCH': spec})
        label = (spec or '(defaults)') + ('' if chunk_size == 64 else f' chunk {chunk_size}')
        if not child_results:
            print(f'{label}: FAILED {failure}', flush=True)
            continue
        result = child_results[0]
        row = f'{label:45s} err {result["worst_error"]:.1e}'
        for name, *_ in SWEEP_SHAPES:
            fwd, total = result[name]
            ratios = f'{fwd / sdpa_ms[name][0]:.2f}x / {total / sdpa_ms[name][1]:.2f}x'
            row += f' | {name}: {fwd:.3f} / {total:.3f} ({ratios})'
        print(row, flush=True)
        print(f'  GPU us per forward+backward per kernel (mlstm_chunk_*), {SWEEP_SHAPES[0][0]}: '
              + ', '.join(f'{kernel[len("mlstm_chunk_"):]} {us:.0f}'
                          for kernel, us in sorted(result['kernels_us'].items())), flush=True)


# issue 10's cell targets: (name, B, N, the largest allowed time ratio against SDPA); NH=4, DH=96, bfloat16
CELL_TARGETS = [('B=1 N=4096', 1, 4096, 1.0), ('B=2 N=16384 (ViL-T 2048 px)', 2, 16384, 0.5)]


def cell_targets(out_lines):
    """CUDA-graph forward+backward ms of fused_chunkwise and SDPA at CELL_TARGETS, their ratio and the target."""
    out_lines.append('| shape | fused_chunkwise ms | SDPA ms | ratio | target | met |')
    out_lines.append('| --- | --- | --- | --- | --- | --- |')
    for name, batch, n, limit in CELL_TARGETS:
        ours, theirs = (time_backend(op, batch, 4, n, 96, torch.bfloat16, graph_only=True)
                        for op in (CHUNKWISE_BACKENDS['fused_chunkwise'], sdpa))
        out_lines.append(f'| {name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f}x | <= {limit}x | '
                         f'{"yes" if ours <= limit * theirs else "no"} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='.', help='folder for mlstm_kernel_check.{txt,json}')
    parser.add_argument('--sweep', action='store_true', help='also time candidate tile configurations')
    parser.add_argument('--quick', action='store_true',
                        help='only a few fused_chunkwise checks and the bfloat16 CUDA-graph table (minutes)')
    parser.add_argument('--vil-shapes', action='store_true',
                        help='only the fused backend at ViL training shapes (seconds; for A/B runs of two trees)')
    parser.add_argument('--targets', action='store_true',
                        help="only issue 10's cell targets against SDPA (seconds)")
    parser.add_argument('--chunkwise-sweep', action='store_true',
                        help='only the launch options of the chunkwise kernels (minutes; one process each)')
    parser.add_argument('--launch', action='append',
                        help='with --chunkwise-sweep: a MMSEG_VIL_CHUNKWISE_LAUNCH value to time instead of the '
                        "built-in list (repeat; '' for the defaults)")
    parser.add_argument('--sweep-chunks', type=int, nargs='+', default=[64],
                        help='with --chunkwise-sweep: chunk sizes to run each launch option at (default 64)')
    parser.add_argument('--child', nargs='+', help=argparse.SUPPRESS)  # one fused_chunkwise case, run by the parent
    args = parser.parse_args()
    if args.child:
        {'check': child_check, 'graph': child_graph, 'sweep': child_sweep}[args.child[0]](*args.child[1:])
        return

    start = time.time()
    out_lines = [f'# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | '
                 f'python {platform.python_version()} | {time.strftime("%Y-%m-%d %H:%M")}']
    results, summary = [], []
    if args.vil_shapes or args.targets:
        (vil_shapes if args.vil_shapes else cell_targets)(out_lines)
        print('\n'.join(out_lines))
        return
    if args.chunkwise_sweep:
        print(out_lines[0], flush=True)
        chunkwise_sweep(args.launch if args.launch is not None else CHUNKWISE_LAUNCHES, args.sweep_chunks)
        return
    if not args.quick:
        check(out_lines, results)
    check_chunkwise(out_lines, results, summary, args.quick)
    for dtype in (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float32):
        graph_timing(out_lines, results, summary, dtype, args.quick)
    if not args.quick:
        for dtype in (torch.bfloat16, torch.float32):
            timing(out_lines, results, dtype)
        profile_fused(out_lines)
    if args.sweep:
        sweep(out_lines, results, torch.bfloat16)
    out_lines.append(f'# total {time.time() - start:.0f} s')
    out_lines.append('## summary')
    out_lines.extend(summary)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'mlstm_kernel_check.json'), 'w') as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, 'mlstm_kernel_check.txt'), 'w') as f:
        f.write('\n'.join(out_lines) + '\n')
    print('\n'.join(out_lines))


if __name__ == '__main__':
    main()
