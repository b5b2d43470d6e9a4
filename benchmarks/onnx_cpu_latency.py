"""CPU latency of UperNet segmentors in ONNX Runtime next to PyTorch, one thread, in one process.

    python benchmarks/onnx_cpu_latency.py --models vil-t deit-t --size 512 --repeats 10 \
        --onnx-mlstm parallel chunkwise --out benchmarks/runs/DATE_onnx_cpu

Each model (the UperNet configs of configs/, random weights, one image of SIZE x SIZE) is exported as
tools/deploy/export_onnx.py exports it (fixed size; ViL traced with each mLSTM form of --onnx-mlstm), then
timed: each repeat runs PyTorch once and ONNX Runtime once, alternately, so a change in the machine's load hits
both; the table reports the best and the median repeat. PyTorch runs eager under inference_mode with the backend
a user gets (ViL: mlstm_backend 'auto'; DeiT: fused SDPA attention, as tools/benchmark.py) and freed memory kept in
the process (glibc, as tools/infer.py); both use 1 thread.
Time on an idle machine only. Writes latency.json and latency.md into --out.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import onnxruntime as ort
import torch

from mmseg_vil.benchmark import build_model, split_model_name, use_sdpa_attention
from mmseg_vil.deploy import choose_mlstm_backend, set_mlstm_backend, trace_segmentor
from mmseg_vil.deploy.export import package_versions
from mmseg_vil.deploy.graph import SegmentorGraph
from mmseg_vil.models.layers.vil_block import MLSTMMixer
from mmseg_vil.utils.cpu_allocator import keep_freed_memory


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def onnx_session(model: torch.nn.Module, size: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    program = trace_segmentor(model, (size, size))
    return ort.InferenceSession(program.model_proto.SerializeToString(), options, providers=['CPUExecutionProvider'])


def measure(name: str, size: int, warmup: int, repeats: int, onnx_mlstm: str = 'auto') -> Dict[str, object]:
    """Best and median ms of PyTorch and ONNX Runtime on one image, timed alternately."""
    torch.manual_seed(0)
    model = build_model(name, 'upernet', size).eval()
    mixers = [m for m in model.modules() if isinstance(m, MLSTMMixer)]
    export_model = copy.deepcopy(model)
    if mixers:
        onnx_backend = choose_mlstm_backend(onnx_mlstm, (size // model.backbone.patch_size)**2)
        set_mlstm_backend(export_model, onnx_backend)
    started = time.perf_counter()
    session = onnx_session(export_model, size)
    export_seconds = time.perf_counter() - started
    use_sdpa_attention(model)
    graph = SegmentorGraph(model).eval()
    inputs = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    feed = {'inputs': inputs.numpy()}

    def run_torch():
        with torch.inference_mode():
            return graph(inputs)

    def run_onnx():
        return session.run(None, feed)[0]

    difference = float(np.abs(run_onnx() - run_torch().numpy()).max())
    for _ in range(warmup):
        run_torch()
        run_onnx()
    times: Dict[str, List[float]] = {'torch': [], 'onnxruntime': []}
    for _ in range(repeats):
        times['torch'].append(seconds(run_torch))
        times['onnxruntime'].append(seconds(run_onnx))
    row = dict(model=name, size=size, torch_path=f'mLSTM {mixers[0].mlstm_backend}' if mixers else 'SDPA attention',
               onnx_path=f'mLSTM {onnx_backend}' if mixers else 'attention', max_abs_diff=difference,
               export_s=round(export_seconds, 1))
    for runtime, values in times.items():
        row[f'{runtime}_best_ms'] = round(1000 * min(values), 1)
        row[f'{runtime}_median_ms'] = round(1000 * statistics.median(values), 1)
    row['speedup_best'] = round(row['torch_best_ms'] / row['onnxruntime_best_ms'], 2)
    return row


def markdown(rows: List[Dict[str, object]], environment: Dict[str, object]) -> str:
    lines = [f"ONNX Runtime vs PyTorch, CPU, 1 thread, batch 1, {environment['cpu']}, "
             f"best / median of {environment['repeats']} alternating repeats, PyTorch allocator: "
             f"{environment['cpu_allocator']}", '',
             '| model | size | PyTorch ms (best / median) | ONNX Runtime ms (best / median) | speed-up (best) | '
             'PyTorch path | ONNX path | max abs diff |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['torch_best_ms']} / {r['torch_median_ms']} | "
                     f"{r['onnxruntime_best_ms']} / {r['onnxruntime_median_ms']} | {r['speedup_best']}x | "
                     f"{r['torch_path']} | {r['onnx_path']} | {r['max_abs_diff']:.2g} |")
    return '\n'.join(lines) + '\n'


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vil-t', 'deit-t'], help='UperNet backbones, e.g. vil-t')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--onnx-mlstm', nargs='+', default=['auto'],
                        help='mLSTM forms to export ViL with, one row each: auto, parallel, chunkwise')
    parser.add_argument('--out', default='work_dirs/onnx_cpu_latency')
    args = parser.parse_args()
    for name in args.models:
        if split_model_name(name)[1]:
            parser.error(f'{name}: the mLSTM backends are chosen by the benchmark (PyTorch: auto; ONNX: export auto)')
    torch.set_num_threads(1)
    kept = keep_freed_memory()  # as tools/infer.py does for PyTorch on CPU; ONNX Runtime has its own arena
    environment = dict(cpu=cpu_name(), threads=1, repeats=args.repeats, warmup=args.warmup,
                       cpu_allocator='freed memory kept (glibc mallopt)' if kept else 'default', **package_versions())
    rows = []
    for name in args.models:
        for onnx_mlstm in args.onnx_mlstm if name.startswith('vil') else ['auto']:
            rows.append(measure(name, args.size, args.warmup, args.repeats, onnx_mlstm))
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'latency.json'), 'w') as f:
        json.dump(dict(environment=environment, results=rows), f, indent=2)
    table = markdown(rows, environment)
    with open(os.path.join(args.out, 'latency.md'), 'w') as f:
        f.write(table)
    print(table)


if __name__ == '__main__':
    main()
