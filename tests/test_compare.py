"""tools/compare.py and mmseg_vil.apis.compare / complexity on a tiny ViL UperNet trained for two iterations.

The same checkpoint enters the comparison twice, evaluated afresh and read from its training work dir, so the
evaluation code must reproduce the validation the training run logged.
"""
import json
import math
import os.path as osp
import runpy
import sys
import uuid

import cv2
import pytest
from e2e_helpers import ROOT, TINY_CONFIG, data_root_options, make_ade20k
from mmengine.config import Config

from mmseg_vil.apis.compare import ModelSpec, compare, render_markdown
from mmseg_vil.apis.complexity import build_inference_model, count_flops, count_parameters
from mmseg_vil.engine import load_config, run_train

COMPARE = osp.join(ROOT, 'tools', 'compare.py')
COLUMNS = '| model | backbone | params (M) | backbone params (M) | GFLOPs @64x64 | mIoU | aAcc | img/s |'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(work dir, dumped config, checkpoint) of a finished 2-iteration run that validated at its end."""
    data_root = make_ade20k(str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016'))
    work_dir = str(tmp_path_factory.mktemp('run'))
    cfg_options = {k: v for k, v in (o.split('=', 1) for o in data_root_options(data_root))}
    cfg_options.update({
        'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'default_hooks.checkpoint.interval': 2,
        # A visualizer of another name would be reused (MMEngine keeps one instance per name per process) and
        # would write this run's scalars into another run's folder.
        'visualizer.name': f'compare-test-{uuid.uuid4().hex}'})
    run_train(load_config(TINY_CONFIG, work_dir=work_dir, cfg_options=cfg_options))
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    return work_dir, osp.join(work_dir, osp.basename(TINY_CONFIG)), checkpoint


def test_compare_evaluates_and_reads_work_dirs_alike(trained):
    work_dir, config, checkpoint = trained
    rows = compare([ModelSpec('evaluated', config=config, checkpoint=checkpoint),
                    ModelSpec('from_work_dir', work_dir=work_dir)], flops_shape=(64, 64))
    evaluated, logged = rows
    assert (evaluated.source, logged.source) == ('evaluated', 'work_dir')
    assert logged.checkpoint == checkpoint
    assert evaluated.mIoU == pytest.approx(logged.mIoU, abs=0.01)
    assert evaluated.aAcc == pytest.approx(logged.aAcc, abs=0.01)

    model = build_inference_model(Config.fromfile(config))
    assert not hasattr(model, 'auxiliary_head')
    expected_params = sum(count_parameters(getattr(model, m)) for m in ('backbone', 'neck', 'decode_head'))
    for row in rows:
        assert row.backbone == 'ViL'
        assert row.params_m * 1e6 == pytest.approx(expected_params)
        assert 0 < row.backbone_params_m < row.params_m
        assert row.gflops == pytest.approx(count_flops(model, (64, 64)) / 1e9)
        assert 0 <= row.mIoU <= 100 and 0 <= row.aAcc <= 100
        assert row.img_per_s > 0 and math.isfinite(row.img_per_s)
        assert 'mAcc' in row.extra

    table = render_markdown(rows).splitlines()
    assert table[0] == COLUMNS
    assert table[2].startswith('| evaluated | ViL | ') and table[3].startswith('| from_work_dir | ViL | ')


def test_vil_flops_include_the_quadratic_mlstm(trained):
    """FLOPs(N tokens) = c + a N + b N^2; b must be the mLSTM's two N x N products: 4 * (2 D) * N^2 per block."""
    _, config, _ = trained
    cfg = Config.fromfile(config)
    cfg.model.backbone.mlstm_backend = 'chunkwise'  # counted in parallel form all the same
    model = build_inference_model(cfg)
    f1, f2, f3 = (count_flops(model, (s, s)) for s in (64, 128, 256))  # 16, 64, 256 tokens of 16x16 pixels
    n1, n2, n3 = 16, 64, 256
    # Eliminate c and a: with n2 = 4 n1 and n3 = 4 n2, (f3 - f2) - 4 (f2 - f1) = b (n3^2 - 5 n2^2 + 4 n1^2).
    quadratic = ((f3 - f2) - 4 * (f2 - f1)) / (n3**2 - 5 * n2**2 + 4 * n1**2)
    arch = cfg.model.backbone.arch
    assert quadratic == pytest.approx(4 * 2 * arch.embed_dims * arch.num_layers)


def test_cli_writes_table_json_and_chart(trained, tmp_path, monkeypatch, capsys):
    work_dir, config, checkpoint = trained
    out_dir = tmp_path / 'report'
    monkeypatch.setattr(sys, 'argv', [COMPARE, '--eval', config, checkpoint, '--work-dir', work_dir, '--names',
                                      'tiny_eval', 'tiny_run', '--shape', '64', '64', '--out-dir', str(out_dir)])
    runpy.run_path(COMPARE, run_name='__main__')
    out = capsys.readouterr().out
    assert COLUMNS in out and '| tiny_eval | ViL |' in out and '| tiny_run | ViL |' in out

    with open(out_dir / 'comparison.json') as f:
        report = json.load(f)
    assert [r['name'] for r in report] == ['tiny_eval', 'tiny_run']
    for entry in report:
        assert {'params_m', 'gflops', 'mIoU', 'aAcc', 'img_per_s', 'config', 'checkpoint'} <= set(entry)
        assert entry['flops_shape'] == [64, 64]
    chart = cv2.imread(str(out_dir / 'comparison.png'))
    assert chart is not None and chart.shape[0] > 100 and chart.shape[1] > 400


def test_model_spec_needs_one_source():
    with pytest.raises(ValueError):
        ModelSpec('neither')
    with pytest.raises(ValueError):
        ModelSpec('both', config='a.py', checkpoint='a.pth', work_dir='run')
