"""Benchmark ViL against DeiT and Vim: img/s and peak memory, training step and inference, backbone or UperNet.

    python tools/benchmark.py --device cuda --models vil-t deit-t vim-t --sizes 224 512 1024 --out-dir bench/
    python tools/benchmark.py --device cpu --amp none --models vil-t deit-t --sizes 512 --modes infer --batch 512=1
    python tools/benchmark.py --models vil-t deit-t --sizes 224 --modes train --execution eager graphs --repeats 5
    python tools/benchmark.py --device cpu --amp none --models vil-t deit-t --sizes 512 --modes infer --batch 512=1 \
        --interleave --repeats 8 --iters 1

``vil-t@parallel`` selects an mLSTM backend. Writes benchmark.json, benchmark.md (tables and ViL-T/DeiT-T ratios)
and benchmark.png into --out-dir.
"""
import argparse
import os

from mmseg_vil.apis.batch_inputs import check_out_dir
from mmseg_vil.benchmark import BACKBONES, EXECUTIONS, check_options, markdown_report, run_benchmark, save_report
from mmseg_vil.utils.cpu_allocator import keep_freed_memory


def parse_batch(items):
    """``['224=64', ...]`` -> ``{224: 64, ...}``; anything else is refused naming the item."""
    batch = {}
    for item in items:
        size, _, value = item.partition('=')
        try:
            batch[int(size)] = int(value)
        except ValueError:
            raise SystemExit(f'--batch {item!r}: expected SIZE=BATCH with two integers, e.g. 224=64') from None
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=sorted(BACKBONES), help='e.g. vil-t vil-t@parallel deit-t')
    parser.add_argument('--sizes', nargs='+', type=int, default=[224, 512, 1024, 2048])
    parser.add_argument('--modes', nargs='+', choices=['train', 'infer'], default=['train', 'infer'])
    parser.add_argument('--scopes', nargs='+', choices=['backbone', 'upernet'], default=['backbone'])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--amp', choices=['bf16', 'fp16', 'none'], default='bf16')
    parser.add_argument('--batch', nargs='*', default=[], metavar='SIZE=BATCH',
                        help='override the per-size batch (defaults 224=64 512=8 1024=2 2048=1)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--execution', nargs='+', choices=EXECUTIONS, default=['eager'],
                        help='eager, compile (torch.compile of backbone and head), graphs (CUDA-graph replay)')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs of --iters steps; the median is reported '
                        '(and the best, in the JSON and the log)')
    parser.add_argument('--interleave', action='store_true',
                        help='time the models of a configuration in turns, one run each per round, all built first '
                        '(for a shared or small CPU; no peak memory)')
    parser.add_argument('--cpu-allocator', choices=['keep', 'default'], default='keep',
                        help='on CPU, keep freed memory in the process (glibc mallopt) or leave malloc as it is; '
                        'applies to every model of the run (mmseg_vil/utils/cpu_allocator.py)')
    parser.add_argument('--out-dir', default='work_dirs/benchmark')
    args = parser.parse_args()
    batch = parse_batch(args.batch)
    try:
        check_options(args.models, args.sizes, batch, args.warmup, args.iters, args.repeats, args.device)
        check_out_dir('--out-dir', args.out_dir)
    except ValueError as error:
        parser.error(str(error))
    os.makedirs(args.out_dir, exist_ok=True)
    kept = args.device.startswith('cpu') and args.cpu_allocator == 'keep' and keep_freed_memory()

    report = run_benchmark(args.models, args.sizes, args.modes, args.scopes, device=args.device,
                           amp=None if args.amp == 'none' else args.amp, batch=batch,
                           warmup=args.warmup, iters=args.iters, executions=args.execution,
                           repeats=args.repeats, interleave=args.interleave,
                           partial_path=os.path.join(args.out_dir, 'benchmark.partial.json'))
    report['environment']['cpu_allocator'] = 'freed memory kept (glibc mallopt)' if kept else 'default'
    report['environment']['command'] = 'python tools/benchmark.py ' + ' '.join(
        f'{k}={v}' for k, v in vars(args).items())
    paths = save_report(report, args.out_dir)
    print(markdown_report(report))
    print('written:', ', '.join(paths.values()))


if __name__ == '__main__':
    main()
