"""Profile one ViL training step on CUDA (bf16 autocast): the kernels that dominate, per mLSTM backend.

    python benchmarks/profile_vil_step.py --backend parallel --size 224 --batch 64 --out $OUT/profile.txt
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import mmseg_vil  # noqa: F401
from mmseg_vil.models.backbones.vil import ViL


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--backend', default='auto')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--out', default='profile.txt')
    args = parser.parse_args()

    model = ViL(arch=args.arch, img_size=args.size, mlstm_backend=args.backend).cuda().train()
    step_model = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device='cuda')

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = sum(o.float().mean() for o in step_model(x))
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by='cuda_time_total', row_limit=30)
    with open(args.out, 'a') as f:
        f.write(f'\n### {vars(args)}\n{table}\n')
    print(table[:6000])


if __name__ == '__main__':
    main()
