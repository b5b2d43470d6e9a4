"""Time the mixer's conv + q/k/v and gated-output Triton kernels under candidate launch configurations on a GPU.

For ViL-T's shapes (inner width 384, 4 heads) at 224 px batch 64, 512 px batch 32 and 1024 px batch 8, in bfloat16:
each kernel's GPU time (torch profiler, mean of the repetitions), its registers and spilled bytes, and the memory
floor (the bytes it must read and write once, over 3 TB/s) for every configuration in the sweep; the current
configuration (``triton_ops.CONV_FORWARD`` etc.) is marked ``*``. Writes a markdown table and a JSON file.

    python benchmarks/tune_mixer_kernels.py --out DIR [--sizes 224 512] [--quick] [--only CONV_BACKWARD ...]
"""
import argparse
import itertools
import json
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mmseg_vil.models.layers.mixer_ops import triton_ops
from mmseg_vil.models.layers.mixer_ops.triton_ops import LAUNCH_TABLES

SHAPES = {224: (64, 14), 512: (32, 32), 1024: (8, 64)}  # size: (batch, tokens per side)
INNER, HEADS, KSIZE = 384, 4, 3
BANDWIDTH = 3.0e12  # bytes/s, about what an H100 SXM reaches on a streaming kernel


def _inputs(batch, side, dtype=torch.bfloat16):
    gen = torch.Generator(device='cuda').manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device='cuda')).to(dtype)

    n = side * side
    return dict(x=rand(batch, n, INNER), conv_weight=torch.randn(INNER, 1, KSIZE, KSIZE, device='cuda') / 3,
                conv_bias=torch.randn(INNER, device='cuda') / 10,
                qkv_weight=torch.randn(3, INNER // 4, 4, 4, device='cuda') / 2,
                qkv_bias=torch.randn(3, INNER, device='cuda') / 10,
                gate_weight=torch.randn(2 * HEADS, 3 * INNER, device='cuda') / 30,
                gate_bias=torch.randn(2 * HEADS, device='cuda'),
                grad_gates=torch.randn(batch, 2 * HEADS, n, device='cuda'),
                qkv=rand(batch, n, 3 * INNER), grad_x_conv=rand(batch, n, INNER),
                grad_qkv=rand(batch, n, 3 * INNER), h=rand(batch, n, HEADS, INNER // HEADS), z=rand(batch, n, INNER),
                norm_weight=torch.ones(INNER, device='cuda'), norm_bias=torch.zeros(INNER, device='cuda'),
                skip=torch.ones(INNER, device='cuda'))


def _calls(t, side):
    """The ops to time, with the bytes each must move (activations only, bf16, the pre-activation gradient too)."""
    act = t['x'].numel() * 2
    conv = lambda: triton_ops.conv_qkv(t['x'], side, side, t['conv_weight'], t['conv_bias'], t['qkv_weight'],
                                       t['qkv_bias'], t['gate_weight'], t['gate_bias'], False)
    conv_bwd = lambda: triton_ops.conv_qkv_backward(t['grad_x_conv'], t['grad_qkv'], t['grad_gates'], t['x'], t['qkv'],
                                                    side, side, t['conv_weight'], t['conv_bias'], t['qkv_weight'],
                                                    t['gate_weight'], False)
    norm = (t['norm_weight'], t['norm_bias'], t['skip'])
    gate = lambda: triton_ops.gated_output(t['h'], t['x'], t['z'], *norm, 1e-5)
    # as mixer_core runs it: the conv's pre-activation in place of its SiLU, the output stored
    grads = [torch.empty_like(t[name]) for name in ('h', 'x', 'z', 'x')]
    gate_bwd = lambda: triton_ops.gated_output_backward_into(t['x'], t['h'], t['x'], t['z'], *norm, 1e-5, *grads,
                                                             x_conv_from_pre=True)
    return {'conv_qkv': (conv, {'conv_qkv_forward_kernel': 5 * act}),
            'conv_qkv_backward': (conv_bwd, {'conv_qkv_backward_kernel': 5 * act + act,
                                             'conv_qkv_input_grad_kernel': act + 3 * act,
                                             'conv_qkv_gate_grad_kernel': 3 * act}),
            'gated_output': (gate, {'gated_output_forward_kernel': 4 * act}),
            'gated_output_backward': (gate_bwd, {'gated_output_backward_kernel': 8 * act})}


def _kernel_times(fn, reps):
    """Mean GPU microseconds per call of each kernel ``fn`` launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time_total / reps
    return dict(times)


def _resources(kernel):
    """(registers, spilled bytes) of the kernel's newest compiled variant on this device."""
    device = torch.cuda.current_device()
    cache = getattr(kernel, 'device_caches', None)
    compiled = list(cache[device][0].values()) if cache else list(getattr(kernel, 'cache', {}).get(device, {}).values())
    if not compiled:
        return None, None
    last = compiled[-1]
    return getattr(last, 'n_regs', None), getattr(last, 'n_spills', None)


def _sweep(quick):
    """Candidate configurations per tunable (name in triton_ops, list of dicts), each table's current one included.
    LOOP_TAPS: the forward's conv taps unrolled (all loads issued up front, more registers) or as a loop (fewer
    registers, more programs per SM); the forward with 4 warps or more (2 warps make its gate dots mma.sync, which
    spills)."""
    loop = (False, True)
    forward = [dict(BLOCK_T=t, BLOCK_G=g, num_warps=w, LOOP_TAPS=taps) for t, g, w, taps in
               itertools.product((16, 32, 64, 128), (4, 8, 16), (4, 8), loop)]
    backward = [dict(BLOCK_T=t, BLOCK_G=g, num_warps=w, TILES=tiles // t, maxnreg=None)
                for t, g, w, tiles in itertools.product((2, 4, 8, 16, 32), (8, 16), (2, 4, 8), (64, 128))]
    backward += [dict(BLOCK_T=t, BLOCK_G=16, num_warps=w, TILES=64 // t, maxnreg=regs)
                 for t, w, regs in itertools.product((8, 16), (4, 8), (128, 168))]
    input_grad = [dict(BLOCK_T=t, BLOCK_G=g, num_warps=w) for t, g, w in
                  itertools.product((2, 4, 8, 16), (8, 16), (2, 4, 8))]
    gated = [dict(TILE_ELEMENTS=e, num_warps=w) for e, w in itertools.product((512, 1024, 2048, 4096), (2, 4, 8))]
    if quick:  # what fits run_gpu_suite.sh's tune step
        forward = [c for c in forward if c['BLOCK_T'] >= 64 and c['BLOCK_G'] in (4, 8)]
        backward = [c for c in backward if c['TILES'] * c['BLOCK_T'] == 128 and c['num_warps'] in (2, 4)]
        input_grad = [c for c in input_grad if c['num_warps'] in (2, 4) and c['BLOCK_T'] >= 8]
    tunables = [('CONV_FORWARD', 'conv_qkv', forward), ('CONV_BACKWARD', 'conv_qkv_backward', backward),
                ('CONV_INPUT_GRAD', 'conv_qkv_backward', input_grad), ('GATED_OUTPUT', 'gated_output', gated),
                ('GATED_OUTPUT', 'gated_output_backward', gated)]
    return [(name, op, candidates + [dict(getattr(triton_ops, name))] * (getattr(triton_ops, name) not in candidates))
            for name, op, candidates in tunables]


KERNELS = {'conv_qkv_forward_kernel': triton_ops.conv_kernels.conv_qkv_forward_kernel,
           'conv_qkv_backward_kernel': triton_ops.conv_kernels.conv_qkv_backward_kernel,
           'conv_qkv_input_grad_kernel': triton_ops.conv_kernels.conv_qkv_input_grad_kernel,
           'conv_qkv_gate_grad_kernel': triton_ops.conv_kernels.conv_qkv_gate_grad_kernel,
           'gated_output_forward_kernel': triton_ops.gate_kernels.gated_output_forward_kernel,
           'gated_output_backward_kernel': triton_ops.gate_kernels.gated_output_backward_kernel}
# The kernels a launch table sets (launch 3 of the conv backward takes launch 1's tiles); the others: all the op's.
TUNED_KERNELS = {'CONV_FORWARD': {'conv_qkv_forward_kernel'},
                 'CONV_BACKWARD': {'conv_qkv_backward_kernel', 'conv_qkv_gate_grad_kernel'},
                 'CONV_INPUT_GRAD': {'conv_qkv_input_grad_kernel'}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='work_dirs/tune_mixer_kernels')
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 512, 1024])
    parser.add_argument('--reps', type=int, default=20)
    parser.add_argument('--quick', action='store_true', help='fewer warp counts')
    parser.add_argument('--only', nargs='+', choices=LAUNCH_TABLES, help='sweep only these launch tables')
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, lines = [], ['| size | tunable | config | kernel | us | floor us | regs | spills |',
                       '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for size in args.sizes:
        batch, side = SHAPES[size]
        calls = _calls(_inputs(batch, side), side)
        for tunable, op, candidates in _sweep(args.quick):
            if args.only and tunable not in args.only:
                continue
            default = dict(getattr(triton_ops, tunable))
            fn, floors = calls[op]
            timed = TUNED_KERNELS.get(tunable, set(floors))
            results = []
            for config in candidates:
                setattr(triton_ops, tunable, config)
                try:
                    times = _kernel_times(fn, args.reps)
                except Exception as error:  # a configuration that does not compile (shared memory, registers)
                    lines.append(f'| {size} | {tunable} | {config} | - | failed: {type(error).__name__} | | | |')
                    continue
                finally:
                    setattr(triton_ops, tunable, default)
                for kernel in sorted(timed):
                    regs, spills = _resources(KERNELS[kernel])
                    us = times.get(kernel, float('inf'))
                    results.append((us, config, kernel, regs, spills))
                    rows.append(dict(size=size, tunable=tunable, config=config, kernel=kernel, us=us,
                                     floor_us=floors[kernel] / BANDWIDTH * 1e6, regs=regs, spills=spills,
                                     current=config == default))
            for us, config, kernel, regs, spills in sorted(results, key=lambda r: r[0])[:8] + [
                    r for r in results if r[1] == default]:
                mark = '*' if config == default else ''
                lines.append(f'| {size} | {tunable}{mark} | {config} | {kernel} | {us:.1f} | '
                             f'{floors[kernel] / BANDWIDTH * 1e6:.1f} | {regs} | {spills} |')
            print('\n'.join(lines[-9:]), flush=True)
    with open(os.path.join(args.out, 'tune_mixer_kernels.md'), 'w') as f:
        f.write(f'{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n' + '\n'.join(lines) + '\n')
    with open(os.path.join(args.out, 'tune_mixer_kernels.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    best = _fastest(rows)
    with open(os.path.join(args.out, 'best.json'), 'w') as f:
        json.dump(best, f, indent=1)
    print(f'fastest over the sizes (for ${triton_ops.LAUNCH_CONFIGS_ENV}): {best}')


def _fastest(rows):
    """Per launch table, the configuration with the least time summed over the sizes and the table's kernels (only
    configurations timed at every size)."""
    totals = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(lambda: defaultdict(int))
    for row in rows:
        key = json.dumps(row['config'], sort_keys=True)
        totals[row['tunable']][key] += row['us']
        counts[row['tunable']][key] += 1
    best = {}
    for tunable, times in totals.items():
        complete = {key: t for key, t in times.items() if counts[tunable][key] == max(counts[tunable].values())}
        best[tunable] = json.loads(min(complete, key=complete.get))
    return best


if __name__ == '__main__':
    main()
