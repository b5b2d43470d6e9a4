"""Throughput and peak-memory benchmark of ViL against DeiT (mmseg ``VisionTransformer``) and Vim.

Every model runs in the same process on the same device with synthetic inputs: backbone alone or the full UperNet
segmentor of ``configs/``, a training step (forward + backward + SGD step) or inference (forward under
``torch.inference_mode``), in img/s and peak allocated GiB (CUDA only). Execution modes: ``eager``, ``compile``
(``torch.compile`` of the backbone and the decode head) and ``graphs`` (the whole step captured once in a CUDA graph
and replayed: no launch overhead). Each configuration is timed ``repeats`` times; the median is reported with the
spread. ``tools/benchmark.py`` is the CLI.
"""
import contextlib
import datetime
import functools
import gc
import glob
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import revert_sync_batchnorm
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import nn

import mmseg_vil  # noqa: F401  (registers ViL and Vim)
from mmseg_vil.apis.complexity import count_parameters
from mmseg_vil.engine.compile import compile_parts
from mmseg_vil.models.layers.mlstm import MLSTM_BACKENDS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BATCH = {224: 64, 512: 8, 1024: 2, 2048: 1}
EXECUTIONS = ('eager', 'compile', 'graphs')

BACKBONES: Dict[str, dict] = {
    'vil-t': dict(type='ViL', arch='tiny'), 'vil-s': dict(type='ViL', arch='small'),
    'vil-b': dict(type='ViL', arch='base'),
    'deit-t': dict(type='VisionTransformer', embed_dims=192, num_heads=3),
    'deit-s': dict(type='VisionTransformer', embed_dims=384, num_heads=6),
    'deit-b': dict(type='VisionTransformer', embed_dims=768, num_heads=12),
    'vim-t': dict(type='Vim', arch='tiny'), 'vim-s': dict(type='Vim', arch='small'),
}
UPERNET_CONFIG_GLOBS = {'vil': 'configs/vil/upernet_vil-{size}16_*.py', 'deit': 'configs/vit/upernet_deit-{size}16_*.py',
                        'vim': 'configs/vim/upernet_vim-{size}*.py'}


@dataclass
class Result:
    model: str
    scope: str
    mode: str
    size: int
    batch: int
    img_per_s: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    ms_per_iter: Optional[float] = None
    execution: str = 'eager'
    spread: Optional[float] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


def split_model_name(name: str):
    """``'vil-t@chunkwise'`` -> (``'vil-t'``, ``'chunkwise'``); the suffix picks the ViL mLSTM backend."""
    base, _, backend = name.partition('@')
    if base not in BACKBONES:
        raise ValueError(f'Unknown model {base!r}; choose from {sorted(BACKBONES)} (ViL may take @<mlstm backend>)')
    return base, backend or None


def _upernet_config(base: str) -> Config:
    family, size = base.split('-')
    pattern = UPERNET_CONFIG_GLOBS[family].format(size=size)
    matches = sorted(glob.glob(str(REPO_ROOT / pattern)))
    if not matches:
        raise FileNotFoundError(f'no UperNet config matches {pattern}')
    return Config.fromfile(matches[0])


def build_model(name: str, scope: str, size: int) -> nn.Module:
    """Backbone (``scope='backbone'``) or full UperNet (``scope='upernet'``) for ``size`` x ``size`` inputs."""
    base, backend = split_model_name(name)
    if scope == 'backbone':
        cfg = dict(BACKBONES[base])
    elif scope == 'upernet':
        full = _upernet_config(base).model
        full.pop('pretrained', None)
        cfg = full.backbone
    else:
        raise ValueError(f'scope must be backbone or upernet, got {scope!r}')
    cfg.update(img_size=size, init_cfg=None)
    if backend:
        cfg['mlstm_backend'] = backend
    if scope == 'upernet':
        full.backbone = cfg
        full.data_preprocessor = None
        return revert_sync_batchnorm(MODELS.build(full))
    return MODELS.build(cfg)


def use_sdpa_attention(model: nn.Module) -> int:
    """Make ``nn.MultiheadAttention`` skip returning attention weights so PyTorch uses fused SDPA kernels.

    mmcv's attention wrapper asks for the weights (and discards them), which forces the unfused path; the
    baseline deserves the fast path. Returns the number of patched modules.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.forward = functools.partial(nn.MultiheadAttention.forward, module, need_weights=False)
            count += 1
    return count


def _synthetic_batch(model: nn.Module, scope: str, batch: int, size: int, device: torch.device):
    images = torch.randn(batch, 3, size, size, device=device)
    if scope == 'backbone':
        return images, None
    num_classes = model.decode_head.num_classes
    samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, size, size), device=device))
        samples.append(sample)
    return images, samples


def _step_fn(model: nn.Module, scope: str, mode: str, images, samples):
    if mode == 'train':
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def step():
            if scope == 'backbone':
                loss = sum(out.float().mean() for out in model(images))
            else:
                loss = sum(v for k, v in model.loss(images, samples).items() if 'loss' in k)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def infer():
        with torch.inference_mode():
            if scope == 'backbone':
                model(images)
            else:
                model.predict(images, samples)
    return infer


def _compile_parts(model: nn.Module, scope: str) -> nn.Module:
    """Compile what the step runs: the backbone alone, or the segmentor's parts as ``compile=True`` in a config does
    (:func:`mmseg_vil.engine.compile.compile_parts`; its ``loss``/``predict`` bypass the segmentor's ``forward``).

    Static shapes: every measurement has one input size, and without ``dynamic=False`` the second size of a run
    recompiles the same code for symbolic sizes (on CPU, ViL-T at 1024 after 512 took over 8 minutes)."""
    if scope == 'backbone':
        return torch.compile(model, dynamic=False)
    compile_parts(model, {'dynamic': False})
    return model


def _graph_replay(step, warmup: int):
    """Capture ``step`` in a CUDA graph after one run on the current stream (where the model's small constants are
    cached, :mod:`mmseg_vil.models.layers.constants`) and ``warmup`` runs on a side stream; returns the replay
    function."""
    step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 2)):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _prepare(result: Result, device: torch.device, amp_dtype, warmup: int):
    """Build ``result``'s model and its step, warmed up (``graphs``: captured in a CUDA graph, peak memory counted from
    before the capture); returns the model, the step and the autocast context the step runs in."""
    if result.execution not in EXECUTIONS:
        raise ValueError(f'execution must be one of {EXECUTIONS}, got {result.execution!r}')
    if result.execution == 'graphs' and device.type != 'cuda':
        raise ValueError('CUDA graphs need a CUDA device')
    model = build_model(result.model, result.scope, result.size).to(device)
    result.extra['params_m'] = round(count_parameters(model) / 1e6, 2)
    result.extra['sdpa_patched'] = use_sdpa_attention(model)
    model.train(result.mode == 'train')
    if result.execution == 'compile':
        model = _compile_parts(model, result.scope)
    images, samples = _synthetic_batch(model, result.scope, result.batch, result.size, device)
    step = _step_fn(model, result.scope, result.mode, images, samples)
    # A graph replays the casts it recorded: autocast's weight cache must stay off while capturing.
    autocast = (torch.autocast(device.type, dtype=amp_dtype, cache_enabled=result.execution != 'graphs')
                if amp_dtype is not None else contextlib.nullcontext())
    with autocast:
        if result.execution == 'graphs':  # the graph's memory pool is allocated while capturing
            _reset_peak_memory(device)
            step = _graph_replay(step, warmup)
        for _ in range(warmup):
            step()
        _sync(device)
    return model, step, autocast


def _timed_run(step, iters: int, device: torch.device) -> float:
    """Milliseconds per step of ``iters`` steps."""
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return 1000 * (time.perf_counter() - start) / iters


def _record(result: Result, runs: List[float]) -> None:
    median = statistics.median(runs)
    result.ms_per_iter = round(median, 3)
    result.img_per_s = round(1000 * result.batch / median, 2)
    result.spread = round((max(runs) - min(runs)) / median, 3)
    result.extra['ms_runs'] = [round(r, 3) for r in runs]
    result.extra['ms_best'] = round(min(runs), 3)


def _error(err: Exception) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return 'OOM'
    return f'{type(err).__name__}: {str(err).splitlines()[0][:200]}'


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def measure(name: str, scope: str, mode: str, size: int, batch: int, device: torch.device, amp_dtype=None,
            warmup: int = 3, iters: int = 10, execution: str = 'eager', repeats: int = 3) -> Result:
    """Time one configuration ``repeats`` times; an error (out of memory, a failed capture) is recorded, not raised."""
    result = Result(model=name, scope=scope, mode=mode, size=size, batch=batch, execution=execution)
    prepared = None
    try:
        prepared = _prepare(result, device, amp_dtype, warmup)
        if execution != 'graphs':
            _reset_peak_memory(device)
        with prepared[2]:
            runs = [_timed_run(prepared[1], iters, device) for _ in range(repeats)]
        _record(result, runs)
        if device.type == 'cuda':
            result.peak_mem_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    except Exception as err:  # noqa: BLE001  (a failing model is a result of the benchmark, not its end)
        result.error = _error(err)
    finally:
        del prepared
        _release(device)
    return result


def measure_interleaved(names: List[str], scope: str, mode: str, size: int, batch: int, device: torch.device,
                        amp_dtype=None, warmup: int = 3, iters: int = 10, execution: str = 'eager',
                        repeats: int = 3) -> List[Result]:
    """Time the models of one configuration in turns: all built and warmed up first, then ``repeats`` rounds of one
    timed run per model. A change of the machine's speed during the measurement (another process, OpenMP threads
    competing, clocks) then reaches every model alike, not whichever ran at the time: the way to compare models on a
    shared or small CPU. Peak memory is not reported (the models are in memory together); errors are recorded per
    model, the others go on."""
    results = [Result(model=name, scope=scope, mode=mode, size=size, batch=batch, execution=execution,
                      extra=dict(interleaved=True)) for name in names]
    prepared, runs = {}, {}
    try:
        for index, result in enumerate(results):
            try:
                prepared[index] = _prepare(result, device, amp_dtype, warmup)
                runs[index] = []
            except Exception as err:  # noqa: BLE001
                result.error = _error(err)
        for _ in range(repeats):
            for index in list(prepared):
                _, step, autocast = prepared[index]
                try:
                    with autocast:
                        runs[index].append(_timed_run(step, iters, device))
                except Exception as err:  # noqa: BLE001
                    results[index].error = _error(err)
                    del prepared[index]
        for index in prepared:
            _record(results[index], runs[index])
    finally:
        prepared.clear()
        _release(device)
    return results


def run_benchmark(models: Iterable[str], sizes: Iterable[int], modes: Iterable[str], scopes: Iterable[str],
                  device: str = 'cuda', amp: Optional[str] = 'bf16', batch: Optional[Dict[int, int]] = None,
                  warmup: int = 3, iters: int = 10, executions: Iterable[str] = ('eager',), repeats: int = 3,
                  partial_path: Optional[str] = None, interleave: bool = False) -> dict:
    """Run every (scope, size, mode, execution, model) combination; returns a JSON-ready dict with environment and
    results. Models of one configuration run one after the other, so their timings share the device's state; with
    ``interleave``, in turns (:func:`measure_interleaved`).

    With ``partial_path`` the report so far is rewritten there after every measurement, so a run cut short by a
    time limit still leaves its results.
    """
    models, sizes = list(models), list(sizes)
    check_options(models, sizes, batch or {}, warmup, iters, repeats, device)
    dev = torch.device(device)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None, 'none': None}[amp]
    batch = {**DEFAULT_BATCH, **(batch or {})}
    results: List[Result] = []
    for scope in scopes:
        for size in sizes:
            for mode in modes:
                for execution in executions:
                    config = (scope, mode, size, batch.get(size, 1), dev, amp_dtype, warmup, iters, execution,
                              repeats)
                    measured = (measure_interleaved(models, *config) if interleave else
                                (measure(name, *config) for name in models))
                    for res in measured:
                        print_log(f'[{scope} {mode} {execution} {size}px b{res.batch}] {res.model}: '
                                  + (res.error or f'{res.img_per_s} img/s, {res.ms_per_iter} ms/iter '
                                     f'(best {res.extra["ms_best"]}, spread {res.spread}), '
                                     f'peak {res.peak_mem_gib} GiB'), logger='current')
                        results.append(res)
                        if partial_path:
                            Path(partial_path).write_text(json.dumps(dict(
                                environment=environment(dev, amp), results=[asdict(r) for r in results]), indent=1))
    return dict(environment=environment(dev, amp), results=[asdict(r) for r in results])


def check_options(models: List[str], sizes: List[int], batch: Dict[int, int], warmup: int, iters: int,
                  repeats: int, device: str) -> None:
    """Refuse, before any model is built, what would give no result or a meaningless one: unknown models or mLSTM
    backends, sizes, batches, iterations or repeats below 1 (a batch of 0 times empty steps: 0 img/s), a batch for a
    size that is not measured (a mistyped size would leave its default batch in the results), a negative warm-up, a
    device name that is none, a CUDA device where CUDA is missing. ``batch`` holds the overrides of DEFAULT_BATCH."""
    for name in models:
        base, backend = split_model_name(name)
        if backend is not None and BACKBONES[base]['type'] != 'ViL':
            raise ValueError(f'{name!r}: only ViL models take @<mlstm backend>')
        if backend is not None and backend not in MLSTM_BACKENDS:
            raise ValueError(f'{name!r}: unknown mLSTM backend {backend!r}; choose one of {sorted(MLSTM_BACKENDS)}')
    for what, values in (('size', sizes), ('batch', batch.values()), ('iters', [iters]), ('repeats', [repeats])):
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f'{what} must be at least 1, got {bad}')
    unmeasured = sorted(set(batch) - set(sizes))
    if unmeasured:
        raise ValueError(f'batch given for size {unmeasured}, which is not among the sizes {sizes}')
    if warmup < 0:
        raise ValueError(f'warmup must be at least 0, got {warmup}')
    try:
        device_type = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f'device {device!r} is not a device name such as cpu, cuda, cuda:1') from error
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device} asked for, but CUDA is not available here; use --device cpu')


def environment(device: torch.device, amp: Optional[str]) -> dict:
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               torch=torch.__version__, python=platform.python_version(), device=str(device), amp=amp,
               cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    try:
        import triton
        env['triton'] = triton.__version__
    except ImportError:
        env['triton'] = None
    return env


def ratio_table(report: dict, reference: str = 'deit-t', candidate: str = 'vil-t') -> List[dict]:
    """Candidate / reference ratios of throughput and memory for each (scope, mode, execution, size); a pair where
    either side failed is listed with the error instead of a ratio."""
    rows = {}
    for r in report['results']:
        key = (r['scope'], r['mode'], r.get('execution', 'eager'), r['size'])
        rows[(*key, split_model_name(r['model'])[0], r['model'])] = r
    out = []
    for (*key, base, name), r in rows.items():
        if base != candidate.split('@')[0]:
            continue
        ref = next((v for k, v in rows.items() if list(k[:4]) == key and k[5] == reference), None)
        if ref is None:
            continue
        row = dict(zip(('scope', 'mode', 'execution', 'size'), key), model=name, reference=reference,
                   speed_ratio=None, memory_ratio=None, error=r['error'] or ref['error'])
        if row['error'] is None:
            row['speed_ratio'] = round(r['img_per_s'] / ref['img_per_s'], 3)
            if r['peak_mem_gib'] and ref['peak_mem_gib']:
                row['memory_ratio'] = round(r['peak_mem_gib'] / ref['peak_mem_gib'], 3)
        out.append(row)
    return out


def markdown_report(report: dict) -> str:
    env = report['environment']
    lines = [f"Device: {env.get('gpu') or env['cpu']} ({env['device']}), torch {env['torch']}, triton "
             f"{env['triton']}, amp {env['amp']}, {env['date']}", '',
             '| scope | mode | execution | size | batch | model | img/s | ms/iter (median) | spread | peak GiB |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in report['results']:
        lines.append(f"| {r['scope']} | {r['mode']} | {r.get('execution', 'eager')} | {r['size']} | {r['batch']} | "
                     f"{r['model']} | {r['img_per_s'] if r['error'] is None else 'FAILED'} | {r['ms_per_iter']} | "
                     f"{r.get('spread')} | {r['peak_mem_gib']} |")
    ratios = ratio_table(report)
    if ratios:
        lines += ['', '| scope | mode | execution | size | model | vs | speed ratio | memory ratio |',
                  '| --- | --- | --- | --- | --- | --- | --- | --- |']
        lines += [f"| {r['scope']} | {r['mode']} | {r['execution']} | {r['size']} | {r['model']} | {r['reference']} "
                  f"| {r['speed_ratio'] if r['error'] is None else 'failed'} | {r['memory_ratio']} |" for r in ratios]
    failed = [r for r in report['results'] if r['error']]
    if failed:
        lines += ['', 'Failed configurations:', '']
        lines += [f"* {r['model']} {r['scope']} {r['mode']} {r.get('execution', 'eager')} {r['size']}px "
                  f"b{r['batch']}: {r['error']}" for r in failed]
    return '\n'.join(lines) + '\n'


def plot_report(report: dict, path: str) -> None:
    """Grouped bars of img/s per (scope, mode, size), one bar per model, log scale."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups = sorted({(r['scope'], r['mode'], r['size']) for r in report['results']})
    models = list(dict.fromkeys(f"{r['model']} {r.get('execution', 'eager')}" for r in report['results']))
    values = {(r['scope'], r['mode'], r['size'], f"{r['model']} {r.get('execution', 'eager')}"): r['img_per_s']
              for r in report['results']}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(models)) / 3), 4))
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        heights = [values.get((*g, model)) or 0 for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], heights, width, label=model)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f'{s}\n{m}\n{z}px' for s, m, z in groups], fontsize=7)
    ax.set_ylabel('img/s')
    if any(v for v in values.values()):
        ax.set_yscale('log')
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(report['environment'].get('gpu') or report['environment']['cpu'], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_report(report: dict, out_dir: str) -> Dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=str(out / 'benchmark.json'), markdown=str(out / 'benchmark.md'), plot=str(out / 'benchmark.png'))
    Path(paths['json']).write_text(json.dumps(report, indent=1))
    Path(paths['markdown']).write_text(markdown_report(report))
    plot_report(report, paths['plot'])
    return paths
