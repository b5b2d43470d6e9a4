"""The benchmark harness: repeats with median and spread, every execution mode honoured for every scope, failures
reported instead of dropped."""
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmseg_vil import benchmark

REPO = Path(__file__).resolve().parents[1]


def test_repeats_give_median_and_spread():
    report = benchmark.run_benchmark(['deit-t'], [32], ['infer'], ['backbone'], device='cpu', amp=None,
                                     batch={32: 1}, warmup=1, iters=1, repeats=3)
    result, = report['results']
    runs = result['extra']['ms_runs']
    assert result['error'] is None and len(runs) == 3
    assert result['ms_per_iter'] == pytest.approx(statistics.median(runs), abs=1e-3)
    assert result['spread'] == pytest.approx((max(runs) - min(runs)) / statistics.median(runs), abs=1e-3)
    assert result['img_per_s'] == pytest.approx(1000 / result['ms_per_iter'], rel=1e-3)


def test_failures_are_listed_with_their_error():
    # CUDA graphs on the CPU fail for both models: the pair stays in the ratio table, marked failed, with the reason.
    report = benchmark.run_benchmark(['vil-t', 'deit-t'], [32], ['infer'], ['backbone'], device='cpu', amp=None,
                                     batch={32: 1}, warmup=1, iters=1, executions=['graphs'], repeats=1)
    assert [r['error'] for r in report['results']] == ['ValueError: CUDA graphs need a CUDA device'] * 2
    ratio, = benchmark.ratio_table(report)
    assert ratio['speed_ratio'] is None and 'CUDA graphs' in ratio['error']
    markdown = benchmark.markdown_report(report)
    assert 'Failed configurations' in markdown and 'vil-t backbone infer graphs 32px b1' in markdown


@pytest.mark.parametrize('scope', ['backbone', 'upernet'])
def test_compile_reaches_the_parts_each_scope_runs(scope, monkeypatch):
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append(type(getattr(fn, '__self__', fn)).__name__)  # the module, or the module of a bound method
        return fn

    monkeypatch.setattr(torch, 'compile', fake_compile)
    model = benchmark.build_model('deit-t', scope, 32)
    benchmark._compile_parts(model, scope)
    # The segmentor's loss/predict bypass its forward: its backbone and heads must be compiled themselves.
    assert compiled == (['VisionTransformer'] if scope == 'backbone' else ['VisionTransformer', 'UPerHead', 'FCNHead'])


@pytest.mark.parametrize('options, match', [
    (dict(models=['vil-t@nope']), "unknown mLSTM backend 'nope'"),
    (dict(models=['deit-t@chunkwise']), 'only ViL models take'),
    (dict(models=['vil-x']), "Unknown model 'vil-x'"),
    (dict(batch={32: 0}), r'batch must be at least 1, got \[0\]'),
    (dict(sizes=[0]), r'size must be at least 1'),
    (dict(iters=0), r'iters must be at least 1'),
    (dict(repeats=0), r'repeats must be at least 1'),
    (dict(warmup=-1), r'warmup must be at least 0'),
    (dict(batch={64: 2}), r'batch given for size \[64\], which is not among the sizes \[32\]'),
    (dict(device='gpu'), r"device 'gpu' is not a device name"),
])
def test_bad_options_are_refused_before_any_model_is_built(options, match, monkeypatch):
    """A batch of 0 used to time empty steps and report 0 img/s; an unknown backend failed each model in turn."""
    monkeypatch.setattr(benchmark, 'build_model', lambda *args: pytest.fail('a model was built'))
    kwargs = dict(models=['vil-t'], sizes=[32], modes=['infer'], scopes=['backbone'], device='cpu', amp=None,
                  batch={32: 1}, warmup=0, iters=1, repeats=1)
    with pytest.raises(ValueError, match=match):
        benchmark.run_benchmark(**{**kwargs, **options})


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal where CUDA is missing')
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match='CUDA is not available here; use --device cpu'):
        benchmark.run_benchmark(['deit-t'], [32], ['infer'], ['backbone'], device='cuda', amp=None, batch={32: 1})


def test_cli_refuses_bad_options_in_one_line_before_writing(tmp_path, monkeypatch, capsys):
    """The library's refusals used to reach the user as tracebacks, after --out-dir had been created."""
    script = str(REPO / 'tools/benchmark.py')
    monkeypatch.setattr(sys, 'argv', [script, '--device', 'cpu', '--models', 'deit-t', '--sizes', '32', '--batch',
                                      '64=2', '--out-dir', str(tmp_path / 'out')])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name='__main__')
    assert exit_info.value.code == 2
    assert 'error: batch given for size [64], which is not among the sizes [32]' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_malformed_batch_option_is_refused():
    run = subprocess.run([sys.executable, str(REPO / 'tools/benchmark.py'), '--device', 'cpu', '--models', 'deit-t',
                          '--sizes', '32', '--batch', '32:1'], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--batch '32:1': expected SIZE=BATCH" in run.stderr


def test_interleaved_models_are_timed_in_turns_and_a_failing_one_does_not_stop_the_others(monkeypatch):
    """All models are built before any is timed, then each round times every model once; a model that fails to
    build is reported with its error while the others are timed."""
    order = []
    real_timed_run = benchmark._timed_run
    built = []
    real_build = benchmark.build_model

    def build(name, scope, size):
        if name == 'vim-t':
            raise RuntimeError('no Mamba kernels here')
        built.append(name)
        return real_build(name, scope, size)

    def timed_run(step, iters, device):
        order.append((len(built), step))  # how many models were built by then, and which one runs
        return real_timed_run(step, iters, device)

    monkeypatch.setattr(benchmark, 'build_model', build)
    monkeypatch.setattr(benchmark, '_timed_run', timed_run)
    report = benchmark.run_benchmark(['deit-t', 'vim-t', 'vil-t'], [32], ['infer'], ['backbone'], device='cpu',
                                     amp=None, batch={32: 1}, warmup=0, iters=1, repeats=3, interleave=True)
    deit, vim, vil = report['results']
    assert vim['error'] == 'RuntimeError: no Mamba kernels here' and vim['ms_per_iter'] is None
    assert built == ['deit-t', 'vil-t'] and [count for count, _ in order] == [2] * 6
    steps = [step for _, step in order]
    assert steps[0] is not steps[1] and steps == steps[:2] * 3  # in turns: deit-t, vil-t, deit-t, ...
    for result in (deit, vil):
        runs = result['extra']['ms_runs']
        assert result['error'] is None and len(runs) == 3 and result['extra']['interleaved']
        assert result['extra']['ms_best'] == min(runs) and result['peak_mem_gib'] is None
