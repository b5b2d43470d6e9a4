"""Profile one ViL training step on CUDA (bf16 autocast): the kernels that dominate, per mLSTM backend; with
``--host``, where the host's time goes instead (an eager step waits for the host when its Python, dispatch and kernel
launches take longer than the GPU's work).

    python benchmarks/profile_vil_step.py --backend parallel --size 224 --batch 64 --out $OUT/profile.txt
    python benchmarks/profile_vil_step.py --host --size 2048 --batch 2 --out $OUT/host.txt
    python benchmarks/profile_vil_step.py --host-variants --size 224 --batch 64 --out $OUT/host_variants.txt

``--host-variants`` times the host in one process three ways: custom ops through torch.library's dispatcher (as
torch.compile sees them), called directly (:mod:`mmseg_vil.models.layers.custom_op`, the eager default), and directly
with every Triton launch a no-op (what the Triton launcher costs; the step's results are then garbage).
"""
import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict

import torch
import triton.runtime.jit as triton_jit
from torch.profiler import ProfilerActivity, profile

import mmseg_vil  # noqa: F401
from mmseg_vil.models.backbones.vil import ViL
from mmseg_vil.models.layers import custom_op


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--backend', default='auto')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--host', action='store_true',
                        help='time the host (issuing a step vs the step with its GPU work) and cProfile it')
    parser.add_argument('--host-variants', action='store_true',
                        help='host time with custom ops dispatched, called directly, and without Triton launches')
    parser.add_argument('--out', default='profile.txt')
    args = parser.parse_args()

    model = ViL(arch=args.arch, img_size=args.size, mlstm_backend=args.backend).cuda().train()
    step_model = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device='cuda')

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = sum(o.float().mean() for o in step_model(x))
        loss.backward()
        model.zero_grad(set_to_none=True)  # as an optimizer step would: no gradient accumulation kernels

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.host or args.host_variants:
        report = host_variants(step) if args.host_variants else host_report(step)
        with open(args.out, 'a') as f:
            f.write(f'\n### {vars(args)}\n{report}\n')
        print(report)
        return
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by='cuda_time_total', row_limit=30)
    kernels = kernel_table(prof, steps=2)
    blocks = block_table(prof, steps=2, depth=len(model.layers))
    sites = launch_sites(prof, steps=2)
    with open(args.out, 'a') as f:
        f.write(f'\n### {vars(args)}\n{table}\n\n{kernels}\n\n{blocks}\n\n{sites}\n')
    print(kernels)
    print(blocks)
    print(sites)


def step_times(step, steps: int = 5) -> str:
    """Host ms to issue a step (returns before its GPU work ends unless the host is the bottleneck) against the
    step's wall time with its GPU work, best of ``steps``."""
    issue, total = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        issue.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        total.append(time.perf_counter() - start)
    return (f'host ms to issue a step: {min(issue) * 1e3:.1f}; step with its GPU work: {min(total) * 1e3:.1f} '
            f'(best of {steps})')


def host_variants(step) -> str:
    """:func:`step_times` with custom ops dispatched, called directly, and called directly without Triton launches
    (module docstring), in that order, after a warm-up step each."""
    direct, launch = custom_op.runs_directly, triton_jit.JITFunction.run
    lines = []
    for name, runs_directly, run in (('custom ops through the dispatcher', lambda args: False, launch),
                                     ('custom ops called directly', direct, launch),
                                     ('called directly, Triton launches as no-ops', direct, lambda *a, **k: None)):
        custom_op.runs_directly, triton_jit.JITFunction.run = runs_directly, run
        try:
            step()
            lines.append(f'{name}: {step_times(step)}')
        finally:
            custom_op.runs_directly, triton_jit.JITFunction.run = direct, launch
    return '\n'.join(lines)


def host_report(step, steps: int = 5, rows: int = 45) -> str:
    """:func:`step_times`, then cProfile's functions by their own time over ``steps`` more steps (its overhead
    inflates small Python functions: read it for shares, not times)."""
    times = step_times(step, steps)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats('tottime').print_stats(rows)
    stats.sort_stats('cumulative').print_stats(rows)
    return times + '\n' + out.getvalue()


def kernel_table(prof, steps: int, rows: int = 40) -> str:
    """GPU time per step of each kernel (by name), largest first: the op table's CUDA columns mix a parent op's own
    launches with its children's, this one counts every kernel once."""
    totals, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / steps
            calls[event.name] += 1
    step_us = sum(totals.values())
    lines = [f'GPU time per step: {step_us / 1e3:.2f} ms in {sum(calls.values()) // steps} kernel launches',
             '| us per step | share | launches per step | kernel |', '| --- | --- | --- | --- |']
    for name, us in sorted(totals.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f'| {us:.0f} | {us / step_us:.1%} | {calls[name] // steps} | {name[:110]} |')
    return '\n'.join(lines)


# The parts of a block, by kernel name: the first pattern a kernel's name contains decides (RESULTS.md's per-block
# tables). Ours by their Triton names, the GEMMs by cuBLAS's, PyTorch's own by its namespace.
BLOCK_PARTS = (
    ('mLSTM cell', ('mlstm_',)),
    ('conv + q/k/v forward (and its recomputation)', ('conv_qkv_forward',)),
    ('conv + q/k/v backward, launch 1', ('conv_qkv_backward',)),
    ('conv input gradient, launch 2', ('conv_qkv_input_grad',)),
    ('conv gate gradients, launch 3', ('conv_qkv_gate_grad',)),
    ('gated output forward + backward', ('gated_output',)),
    ('LayerNorm forward + backward', ('layer_norm',)),
    ('column sums (GEMV)', ('gemv',)),
    ('GEMMs', ('nvjet', 'gemm', 'cutlass', 'splitKreduce', 'xmma')),
    ('PyTorch elementwise, reductions, copies', ('at::', 'Memcpy', 'Memset')),
)


def block_table(prof, steps: int, depth: int) -> str:
    """GPU time per step and per block (the step's time over the blocks) of each part of a block (BLOCK_PARTS; the
    rest, e.g. the patch embedding's convolution, as 'other')."""
    totals, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            part = next((name for name, patterns in BLOCK_PARTS if any(p in event.name for p in patterns)), 'other')
            totals[part] += event.device_time_total / steps
            calls[part] += 1
    lines = [f'Per block ({depth} blocks; the step\'s time of each part over the blocks)',
             '| part | us per block | launches per block | us per step |', '| --- | --- | --- | --- |']
    for part in [name for name, _ in BLOCK_PARTS] + ['other']:
        if part in totals:
            lines.append(f'| {part} | {totals[part] / depth:.0f} | {calls[part] / steps / depth:.1f} | '
                         f'{totals[part]:.0f} |')
    step_us = sum(totals.values())
    lines.append(f'| **step** | **{step_us / depth:.0f}** | {sum(calls.values()) / steps / depth:.1f} | '
                 f'{step_us:.0f} |')
    return '\n'.join(lines)


def launch_sites(prof, steps: int, rows: int = 30) -> str:
    """GPU time per step of PyTorch's own kernels (not ours, not GEMMs) by the op that launched them and where: its
    parent ops and the innermost lines of mmseg_vil (forward) or the autograd node (backward), to find copies, casts
    and reductions worth fusing."""
    totals, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU or not event.kernels:
            continue
        chain, parent = [event.name], event.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name)
            parent = parent.cpu_parent
        lines = [frame for frame in event.stack if 'mmseg_vil' in frame][:2]
        site = ' < '.join(chain) + (' @ ' + ' < '.join(line.split('mmseg_vil/')[-1] for line in lines) if lines else '')
        for kernel in event.kernels:
            if kernel.name.startswith(('void at::', 'Memcpy', 'Memset')):
                key = (kernel.name.split('<')[0].split('(')[0][-40:], site)
                totals[key] += kernel.duration / steps
                calls[key] += 1
    lines = ['PyTorch kernels by launch site (us per step, launches per step, kernel, site)']
    for key, us in sorted(totals.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f'{us:7.0f} {calls[key] // steps:4d}  {key[0]}  {key[1][:230]}')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
