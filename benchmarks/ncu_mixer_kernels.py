"""Run each of ViL-T's Triton kernels once, at 224 px batch 64 in bfloat16, inside an NVTX range ``measure``, for
Nsight Compute: what bounds each kernel (memory, issue, latency, occupancy), before optimising it. With
``--chunkwise`` the chunkwise mLSTM's kernels instead, at ViL-T's 2048 px shape (batch 2, 16384 tokens).

    ncu --nvtx --nvtx-include "measure/" --section SpeedOfLight --section Occupancy ... \\
        python benchmarks/ncu_mixer_kernels.py

(``bash benchmarks/run_gpu_suite.sh OUT ncu`` runs it so.) Without ncu it just runs the kernels.
"""
import argparse

import torch

from mmseg_vil.models.layers.mlstm import fused
from mmseg_vil.models.layers.mlstm.fused_chunkwise import op as chunkwise
from tune_mixer_kernels import SHAPES, _calls, _inputs

HEADS, HEAD_DIM = 4, 96


def _mlstm_calls(batch, n, chunk_size=0):
    """The mLSTM cell's forward and backward at ``batch`` x ``n`` tokens: the quadratic kernels, or the chunkwise ones
    with chunks of ``chunk_size``."""
    gen = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(batch, n, HEADS, HEAD_DIM, generator=gen, device='cuda').to(torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    igate = torch.randn(batch, HEADS, n, generator=gen, device='cuda')
    fgate = 3 + torch.randn(batch, HEADS, n, generator=gen, device='cuda')
    if chunk_size:
        h, *stats = chunkwise.forward_kernels(q, k, v, igate, fgate, 1e-6, chunk_size, False)
        grad_h = torch.randn_like(h)
        grads = [torch.empty_like(h) for _ in range(3)] + [torch.empty(batch, n, HEADS, device='cuda')
                                                          for _ in range(2)]
        return {'chunkwise_forward': lambda: chunkwise.forward_kernels(q, k, v, igate, fgate, 1e-6, chunk_size, False),
                'chunkwise_backward': lambda: chunkwise.backward_kernels_into(
                    grad_h, q, k, v, igate, fgate, h, stats, 1e-6, chunk_size, False, *grads)}
    h, *stats = fused.fused_forward(q, k, v, igate, fgate, 1e-6, False)
    grad_h = torch.randn_like(h)
    return {'mlstm_forward': lambda: fused.fused_forward(q, k, v, igate, fgate, 1e-6, False),
            'mlstm_backward': lambda: fused.fused_backward(grad_h, q, k, v, h, igate, fgate, *stats, 1e-6, False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--chunkwise', type=int, default=0, metavar='CHUNK',
                        help='the chunkwise mLSTM kernels with chunks of CHUNK steps at batch 2 x 16384 tokens')
    args = parser.parse_args()
    if args.chunkwise:
        calls = _mlstm_calls(2, 16384, args.chunkwise)
    else:
        batch, side = SHAPES[224]
        calls = {name: fn for name, (fn, _) in _calls(_inputs(batch, side), side).items()}
        calls.update(_mlstm_calls(batch, side * side))
    for fn in calls.values():  # compile and warm up outside the range
        fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push('measure')
    for name, fn in calls.items():
        print('running', name, flush=True)
        fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


if __name__ == '__main__':
    main()
