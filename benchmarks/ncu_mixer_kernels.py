"""Run each of ViL-T's Triton kernels once, at 224 px batch 64 in bfloat16, inside an NVTX range ``measure``, for
Nsight Compute: what bounds each kernel (memory, issue, latency, occupancy), before optimising it.

    ncu --nvtx --nvtx-include "measure/" --section SpeedOfLight --section Occupancy ... \\
        python benchmarks/ncu_mixer_kernels.py

(``bash benchmarks/run_gpu_suite.sh OUT ncu`` runs it so.) Without ncu it just runs the kernels.
"""
import torch

from mmseg_vil.models.layers.mlstm import fused
from tune_mixer_kernels import SHAPES, _calls, _inputs

HEADS, HEAD_DIM = 4, 96


def _mlstm_calls(batch, n):
    gen = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(batch, n, HEADS, HEAD_DIM, generator=gen, device='cuda').to(torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    igate = torch.randn(batch, HEADS, n, generator=gen, device='cuda')
    fgate = 3 + torch.randn(batch, HEADS, n, generator=gen, device='cuda')
    h, *stats = fused.fused_forward(q, k, v, igate, fgate, 1e-6, False)
    grad_h = torch.randn_like(h)
    return {'mlstm_forward': lambda: fused.fused_forward(q, k, v, igate, fgate, 1e-6, False),
            'mlstm_backward': lambda: fused.fused_backward(grad_h, q, k, v, h, igate, fgate, *stats, 1e-6, False)}


def main():
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
