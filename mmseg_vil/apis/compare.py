"""Compare segmentors on one validation set: size, compute, accuracy and speed in one table, JSON and chart.

A model enters the comparison in one of two ways:

* :func:`evaluate_model` evaluates a config's model holding a checkpoint on the config's test set and times it;
* :func:`read_work_dir` reads a finished training run (``tools/train.py`` work dir): the config the run dumped and
  the metrics of its last validation, with throughput from that validation's logged iteration times.

Either way :func:`compare` adds parameters and FLOPs at a common input size (:mod:`.complexity`), and
:func:`render_markdown`, :func:`write_json` and :func:`plot_comparison` report the rows.

Throughput (img/s) is images over the time spent in ``model.test_step`` (preprocessing, forward, resizing the
prediction), excluding data loading and the first ``warmup`` batches, at the test dataloader's batch size.
"""
import glob
import json
import os.path as osp
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from mmengine.evaluator import Evaluator
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from torch import nn

from ..utils.config import read_model_config
from .batch_inputs import resolve_device
from .complexity import build_inference_model, count_flops, count_parameters
from .inference import init_segmentor

FLOPS_SHAPE = (512, 512)


@dataclass
class ModelSpec:
    """A model to compare: a config with a checkpoint to evaluate, or a finished work dir to read."""

    name: str
    config: Optional[str] = None
    checkpoint: Optional[str] = None
    work_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.work_dir is None) == (self.config is None or self.checkpoint is None):
            raise ValueError(f'{self.name}: give either config and checkpoint, or work_dir')


@dataclass
class ComparisonRow:
    """One model's line of the comparison; metrics in percent, as MMSegmentation's IoUMetric reports them."""

    name: str
    backbone: str
    params_m: float  # inference model (backbone, neck, decode head), millions
    backbone_params_m: float
    gflops: float  # at ``flops_shape``, 2 FLOPs per multiply-add
    flops_shape: Tuple[int, int]
    mIoU: Optional[float]
    aAcc: Optional[float]
    img_per_s: Optional[float]
    source: str  # 'evaluated' or 'work_dir'
    config: str
    checkpoint: Optional[str] = None
    extra: Dict[str, float] = field(default_factory=dict)  # other metrics, e.g. mAcc


def evaluate_model(model: nn.Module, config: Config, warmup: int = 2) -> Dict[str, float]:
    """Evaluate ``model`` on the test set of ``config``; return its metrics plus ``img_per_s``.

    The first ``warmup`` batches (fewer on a tiny set) are evaluated but not timed: they pay one-off costs.
    """
    init_default_scope(config.get('default_scope', 'mmseg'))
    dataloader = Runner.build_dataloader(config.test_dataloader)
    evaluator = Evaluator(config.test_evaluator)
    evaluator.dataset_meta = dataloader.dataset.metainfo
    warmup = min(warmup, len(dataloader) - 1)  # time at least one batch
    seconds, timed_images = 0.0, 0
    with torch.no_grad():
        for index, data in enumerate(dataloader):
            start = time.perf_counter()
            outputs = model.test_step(data)
            if index >= warmup:
                seconds += time.perf_counter() - start
                timed_images += len(outputs)
            evaluator.process(data_samples=outputs, data_batch=data)
    metrics = {name: float(value) for name, value in evaluator.evaluate(len(dataloader.dataset)).items()}
    metrics['img_per_s'] = timed_images / seconds
    return metrics


def _latest_validation(work_dir: str) -> Tuple[str, dict]:
    """(run folder, last record with mIoU) of the newest run in ``work_dir`` that validated."""
    for run_dir in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data')), reverse=True):
        scalars = osp.join(run_dir, 'scalars.json')
        if not osp.isfile(scalars):
            continue
        with open(scalars) as f:
            records = [json.loads(line) for line in f if line.strip()]
        validations = [r for r in records if 'mIoU' in r]
        if validations:
            return run_dir, validations[-1]
    raise FileNotFoundError(f'no run in {work_dir} logged a validation with mIoU (vis_data/scalars.json)')


def read_work_dir(work_dir: str) -> Tuple[Config, Optional[str], Dict[str, Optional[float]]]:
    """Config, last checkpoint (or None) and last validation metrics of a finished ``tools/train.py`` run.

    The config is the one that run dumped (``<run>/vis_data/config.py``), so later edits of the source config do
    not leak in. Throughput comes from the validation's logged mean iteration ``time`` minus ``data_time``.
    """
    run_dir, record = _latest_validation(work_dir)
    config = Config.fromfile(osp.join(run_dir, 'config.py'))
    metrics: Dict[str, Optional[float]] = {
        k: float(v) for k, v in record.items() if k not in ('step', 'time', 'data_time')}
    model_seconds = record.get('time', 0.0) - record.get('data_time', 0.0)
    batch_size = config.val_dataloader.get('batch_size', 1)
    metrics['img_per_s'] = batch_size / model_seconds if model_seconds > 0 else None  # None: not logged
    checkpoint = None
    last = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(last):
        with open(last) as f:
            checkpoint = f.read().strip() or None
    return config, checkpoint, metrics


def _backbone_name(config: Config) -> str:
    backbone_type = config.model.backbone.type
    return backbone_type if isinstance(backbone_type, str) else backbone_type.__name__


def compare(specs: Sequence[ModelSpec],
            flops_shape: Tuple[int, int] = FLOPS_SHAPE,
            device: Optional[str] = None,
            allow_partial: bool = False) -> List[ComparisonRow]:
    """Evaluate or read every model of ``specs`` and measure its size and compute (on CUDA when available, unless
    ``device`` says otherwise).

    Every checkpoint is loaded (under the package's policy; ``allow_partial`` as in :func:`.init_segmentor`) and
    every work dir read before the first evaluation, so that a bad input stops the comparison before any work.
    """
    device = resolve_device(device)
    sources = []
    for spec in specs:
        if spec.work_dir is not None:
            sources.append((*read_work_dir(spec.work_dir), None, 'work_dir'))
        else:
            config = read_model_config(spec.config, 'segmentation')
            model = init_segmentor(config, spec.checkpoint, device, allow_partial=allow_partial)
            sources.append((config, spec.checkpoint, None, model, 'evaluated'))
    rows = []
    for spec, (config, checkpoint, metrics, evaluated_model, source) in zip(specs, sources):
        if evaluated_model is not None:
            metrics = evaluate_model(evaluated_model, config)
        model = build_inference_model(config)
        rows.append(
            ComparisonRow(
                name=spec.name,
                backbone=_backbone_name(config),
                params_m=count_parameters(model) / 1e6,
                backbone_params_m=count_parameters(model.backbone) / 1e6,
                gflops=count_flops(model, flops_shape, device=device) / 1e9,
                flops_shape=tuple(flops_shape),
                mIoU=metrics.pop('mIoU', None),
                aAcc=metrics.pop('aAcc', None),
                img_per_s=metrics.pop('img_per_s', None),
                source=source,
                config=config.filename,
                checkpoint=checkpoint,
                extra=metrics))
    return rows


def _known(value: Optional[float]) -> bool:
    return value is not None and value == value  # neither missing nor NaN


def _fmt(value: Optional[float], digits: int) -> str:
    return f'{value:.{digits}f}' if _known(value) else '-'


def render_markdown(rows: Sequence[ComparisonRow]) -> str:
    """A markdown table of ``rows`` with a note on how FLOPs and speed were measured."""
    shape = 'x'.join(map(str, rows[0].flops_shape)) if rows else 'x'.join(map(str, FLOPS_SHAPE))
    lines = [
        f'| model | backbone | params (M) | backbone params (M) | GFLOPs @{shape} | mIoU | aAcc | img/s |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        lines.append(f'| {r.name} | {r.backbone} | {_fmt(r.params_m, 2)} | {_fmt(r.backbone_params_m, 2)} | '
                     f'{_fmt(r.gflops, 2)} | {_fmt(r.mIoU, 2)} | {_fmt(r.aAcc, 2)} | {_fmt(r.img_per_s, 1)} |')
    lines.append('')
    lines.append('params and GFLOPs: backbone + neck + decode head (no auxiliary head); FLOPs count a multiply-add as '
                 '2 (halve for the MAC-based "FLOPs" of fvcore/MMEngine/papers), element-wise ops not counted. '
                 'mIoU/aAcc in %. img/s: model time on the validation set, data loading excluded.')
    if any(r.source == 'work_dir' for r in rows):
        lines.append('Rows read from work dirs report the metrics and timings logged by their training-time '
                     'validation (timings then depend on the load of the machine during training).')
    return '\n'.join(lines)


def write_json(rows: Sequence[ComparisonRow], path: str) -> None:
    with open(path, 'w') as f:
        json.dump([asdict(r) for r in rows], f, indent=2)


def plot_comparison(rows: Sequence[ComparisonRow], path: str) -> None:
    """Bar charts of mIoU, throughput, GFLOPs and parameters, one bar per model (PNG, no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = [('mIoU (%)', 'mIoU'), ('img/s', 'img_per_s'), (f'GFLOPs @{rows[0].flops_shape[0]}', 'gflops'),
              ('params (M)', 'params_m')]
    names = [r.name for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, key) in zip(axes, panels):
        values = [getattr(r, key) if _known(getattr(r, key)) else 0.0 for r in rows]
        bars = ax.bar(names, values, color=[f'C{i}' for i in range(len(rows))])
        ax.bar_label(bars, fmt='%.2f' if key != 'img_per_s' else '%.1f', fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis='x', labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
