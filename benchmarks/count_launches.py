"""Count what one ViL training step launches on the GPU path, on a machine without a GPU: the Triton kernels (run by
the interpreter as no-ops) and PyTorch's compute ops (each one kernel launch on CUDA: products, casts, copies, sums,
fills), per step and per block, by kernel and by the line that issued it. Also times the step's host work (float
shapes too small to compute much; the Triton launches skipped), the part that an eager GPU step waits for, and
counts the ATen calls made from outside ATen (views and no-op casts included: on the GPU machine's host each costs
several microseconds).

    python benchmarks/count_launches.py [--blocks 24] [--sites]

Why: in a CUDA-graph step every launch costs ~2 us of GPU time however small its kernel, and in an eager step the
host's time to issue it (RESULTS.md, ninth session); the count is exact offline where GPU time is scarce.
"""
import argparse
import collections
import os
import time

os.environ['TRITON_INTERPRET'] = '1'  # before the kernels are decorated

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from mmseg_vil.models.backbones.vil import ViL  # noqa: E402

# ATen ops that launch a kernel on CUDA (views, allocations and metadata ops launch none)
COMPUTE_OPS = {'copy_', 'mm', 'mv', 'addmm', 'addmv', 'bmm', 'baddbmm', 'fill_', 'zero_', 'add', 'add_', 'sub',
               'mul', 'mul_', 'div', 'div_', 'cat', 'sum', 'mean', 'clone', 'where', 'exp', 'sigmoid', 'neg',
               'convolution', 'convolution_backward', 'native_layer_norm', 'native_layer_norm_backward',
               'bernoulli_', 'addcmul_', 'masked_fill'}


def _outermost_compute(event) -> bool:
    """Whether a compute op is not inside another (a cast's copy inside ``to`` counts once, as ``copy_``)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith('aten::') and parent.name[6:] in COMPUTE_OPS:
            return False
        parent = parent.cpu_parent
    return True


def _our_caller(event) -> str:
    """The innermost of our Python functions that the op ran under (with_stack's function events), else the autograd
    engine's node."""
    parent, node = event.cpu_parent, None
    while parent is not None:
        if 'mmseg_vil/' in parent.name:
            return parent.name.split('mmseg_vil/', 1)[1]
        if node is None and parent.name.startswith('autograd::engine'):
            node = parent.name.split(': ', 1)[-1]
        parent = parent.cpu_parent
    return f'autograd engine: {node}'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--blocks', type=int, default=24, help='mLSTM blocks (ViL-T: 24)')
    parser.add_argument('--sites', action='store_true', help='list PyTorch launches by the line that issued them')
    args = parser.parse_args()
    torch.set_num_threads(1)
    triton_launches = collections.Counter()
    interpreter.InterpretedFunction.run = lambda kernel, *a, **k: triton_launches.update([kernel.fn.__name__])
    # narrow blocks and 4 tokens: the ops and launches of ViL-T's step, hardly any arithmetic
    model = ViL(arch=dict(embed_dims=16, num_layers=args.blocks), img_size=32, mlstm_backend='fused').train()
    x = torch.randn(1, 3, 32, 32)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = sum(out.float().mean() for out in model(x))
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    triton_launches.clear()
    with profile(activities=[ProfilerActivity.CPU], with_stack=args.sites) as prof:
        step()
    torch_ops, sites = collections.Counter(), collections.Counter()
    # every ATen call made from outside ATen (views and no-op casts too): each is a dispatch the host pays for
    dispatches = sum(event.name.startswith('aten::') and not (event.cpu_parent is not None and
                                                             event.cpu_parent.name.startswith('aten::'))
                     for event in prof.events())
    for event in prof.events():
        if event.name.startswith('aten::') and event.name[6:] in COMPUTE_OPS and _outermost_compute(event):
            torch_ops[event.name[6:]] += 1
            if args.sites:
                sites[(event.name[6:], _our_caller(event))] += 1
    total_triton, total_torch = sum(triton_launches.values()), sum(torch_ops.values())
    print(f'ViL, {args.blocks} blocks, one training step (bf16 autocast): {total_triton + total_torch} launches, '
          f'{(total_triton + total_torch) / args.blocks:.1f} per block; host time {min(times) * 1e3:.1f} ms '
          f'(best of {len(times)}, 1 thread, launches skipped); {dispatches} ATen calls')
    print(f'Triton {total_triton} ({total_triton / args.blocks:.1f} per block):', dict(triton_launches.most_common()))
    print(f'PyTorch {total_torch} ({total_torch / args.blocks:.1f} per block):', dict(torch_ops.most_common()))
    for (name, site), count in sites.most_common():
        print(f'{count:6d}  {name:10s} {site}')


if __name__ == '__main__':
    main()
