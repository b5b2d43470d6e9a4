"""tools/compare.py and mmseg_vil.apis.compare / complexity on a tiny ViL UperNet trained for two iterations.

The same checkpoint enters the comparison twice, evaluated afresh and read from its training work dir, so the
evaluation code must reproduce the validation the training run logged. The numbers themselves are checked against
expectations computed here without the package: parameters and FLOPs of small modules by hand, ViL's FLOPs against
the official count (tests/data/spec_excerpts.md, §4), mIoU and aAcc of a model that predicts one class everywhere
from the label files, throughput from a hand-written training log.
"""
import glob
import json
import math
import os.path as osp
import runpy
import sys
import uuid

import cv2
import numpy as np
import pytest
import torch
from e2e_helpers import ROOT, TINY_CONFIG, data_root_options, make_ade20k
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
from torch import nn

from mmseg_vil.apis.compare import ModelSpec, compare, render_markdown
from mmseg_vil.apis.complexity import build_inference_model, count_flops, count_parameters
from mmseg_vil.engine import load_config, run_train
from mmseg_vil.models.backbones import ViL
from mmseg_vil.utils.config import ConfigError

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
    with DefaultScope.overwrite_default_scope('mmseg'):
        full = MODELS.build(Config.fromfile(config).model)  # with its auxiliary head, which is not counted
    expected_params = {part: sum(p.numel() for p in getattr(full, part).parameters())
                       for part in ('backbone', 'neck', 'decode_head')}
    for row in rows:
        assert row.backbone == 'ViL'
        assert row.params_m * 1e6 == pytest.approx(sum(expected_params.values()))
        assert row.backbone_params_m * 1e6 == pytest.approx(expected_params['backbone'])
        assert row.gflops == pytest.approx(count_flops(model, (64, 64)) / 1e9)
        assert 0 <= row.mIoU <= 100 and 0 <= row.aAcc <= 100
        assert row.img_per_s > 0 and math.isfinite(row.img_per_s)
        assert 'mAcc' in row.extra

    table = render_markdown(rows).splitlines()
    assert table[0] == COLUMNS
    assert table[2].startswith('| evaluated | ViL | ') and table[3].startswith('| from_work_dir | ViL | ')


def test_constant_prediction_scores_by_hand(trained, tmp_path):
    """A checkpoint whose classifier predicts class k everywhere: IoU(k) = (pixels of k) / (labelled pixels), every
    other labelled class scores 0, classes never labelled nor predicted are left out (MMSeg's nan-mean)."""
    _, config, checkpoint = trained
    cfg = Config.fromfile(config)
    labels = [cv2.imread(path, cv2.IMREAD_UNCHANGED) for path in sorted(glob.glob(osp.join(
        cfg.test_dataloader.dataset.data_root, cfg.test_dataloader.dataset.data_prefix.seg_map_path, '*.png')))]
    assert len(labels) == 2  # make_ade20k's validation images
    pixels = np.concatenate([label.ravel() for label in labels])
    pixels = pixels[pixels != 0].astype(int) - 1  # reduce_zero_label: file value 0 is ignored, v is class v - 1
    counts = np.bincount(pixels, minlength=150)
    k = int(counts.argmax())
    present = set(np.flatnonzero(counts)) | {k}
    expected_aacc = 100 * counts[k] / len(pixels)
    expected_miou = expected_aacc / len(present)

    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    weights = state['state_dict']
    weights['decode_head.conv_seg.weight'].zero_()
    weights['decode_head.conv_seg.bias'].zero_()[k] = 10.0
    constant = str(tmp_path / 'constant.pth')
    torch.save(state, constant)
    row, = compare([ModelSpec('constant', config=config, checkpoint=constant)], flops_shape=(64, 64))
    assert 0 < expected_miou < expected_aacc < 100
    assert row.aAcc == pytest.approx(expected_aacc, abs=0.01)
    assert row.mIoU == pytest.approx(expected_miou, abs=0.01)


def test_work_dir_metrics_and_speed_by_hand(trained, tmp_path):
    """The last validation of the newest run that validated; img/s = batch size / (iteration time - data time)."""
    _, config, _ = trained
    cfg = Config.fromfile(config)
    cfg.val_dataloader.batch_size = 4
    records = {
        '20260101_000000': [{'loss': 1.0, 'step': 2}, {'aAcc': 50.0, 'mIoU': 10.0, 'mAcc': 20.0, 'data_time': 0.1,
                                                       'time': 0.6, 'step': 2}],
        '20260102_000000': [{'aAcc': 80.0, 'mIoU': 40.5, 'mAcc': 55.0, 'data_time': 0.05, 'time': 0.25, 'step': 2},
                            {'aAcc': 81.0, 'mIoU': 41.5, 'mAcc': 56.0, 'data_time': 0.05, 'time': 0.55, 'step': 4}],
        '20260103_000000': [{'loss': 0.5, 'step': 6}],  # a later run that has not validated yet
    }
    for run, lines in records.items():
        vis_data = tmp_path / run / 'vis_data'
        vis_data.mkdir(parents=True)
        cfg.dump(str(vis_data / 'config.py'))
        (vis_data / 'scalars.json').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_4.pth'))
    row, = compare([ModelSpec('logged', work_dir=str(tmp_path))], flops_shape=(64, 64))
    assert (row.mIoU, row.aAcc, row.extra) == (41.5, 81.0, {'mAcc': 56.0})
    assert row.img_per_s == pytest.approx(4 / (0.55 - 0.05))
    assert row.checkpoint == str(tmp_path / 'iter_4.pth') and row.source == 'work_dir'


class ConvThenLinear(nn.Module):
    """A 3x3 conv with stride (1, 3) and a linear layer, called the way count_flops calls a segmentor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=(1, 3), padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, inputs: torch.Tensor, mode: str) -> torch.Tensor:
        assert mode == 'tensor'
        return self.fc(self.conv(inputs).mean((2, 3)))


def test_parameters_and_flops_of_small_modules_by_hand():
    model = ConvThenLinear()
    model.conv.requires_grad_(False)  # frozen parameters count too
    assert count_parameters(model) == (8 * 3 * 3 * 3 + 8) + (5 * 8 + 5)
    assert count_parameters(nn.BatchNorm2d(6)) == 12  # weight and bias; running statistics are buffers
    # 20 x 30 input: 20 x 10 output positions of 8 channels, each 3 * 3 * 3 multiply-adds; 2 FLOPs per multiply-add.
    assert count_flops(model, (20, 30)) == 2 * (20 * 10 * 8 * 27 + 5 * 8)
    assert count_flops(model, (30, 20)) == 2 * (30 * 7 * 8 * 27 + 5 * 8)


class PooledClassifier(nn.Module):
    """ViL with the released classifiers' linear head, as measured in the spec, callable like a segmentor."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.backbone = ViL(arch=arch, out_indices=-1, out_type='pooled', final_norm=True, mlstm_backend='parallel')
        self.head = nn.Linear(2 * self.backbone.embed_dims, 1000)

    def forward(self, inputs: torch.Tensor, mode: str) -> torch.Tensor:
        return self.head(self.backbone(inputs)[0])


@pytest.mark.parametrize('arch,official_gmacs', [('tiny', 1.859), ('small', 5.799)])  # base: 6 s more
def test_vil_flops_match_the_official_count(arch, official_gmacs):
    """vil_spec §4 (tests/data/spec_excerpts.md): VisionLSTM2 at 224x224, batch 1, FlopCounterMode, in G MACs."""
    assert count_flops(PooledClassifier(arch).eval(), (224, 224)) / 2e9 == pytest.approx(official_gmacs, abs=5e-4)


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


@pytest.mark.parametrize('options, message', [
    (['--shape', '0', '0'], '--shape must be at least 1, got 0'),
    (['--out-dir', TINY_CONFIG], f'--out-dir {TINY_CONFIG} is a file, not a folder'),
])
def test_cli_refuses_bad_options_before_evaluating(options, message, monkeypatch, capsys):
    """Both used to end in a traceback only after every model had been evaluated."""
    monkeypatch.setattr(sys.modules['mmseg_vil.apis.compare'], 'compare', lambda *args, **kwargs: pytest.fail('ran'))
    monkeypatch.setattr(sys, 'argv', [COMPARE, '--eval', TINY_CONFIG, 'model.pth', '--device', 'cpu', *options])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(COMPARE, run_name='__main__')
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_config_of_another_kind_is_named_before_any_model_loads(tmp_path):
    checkpoint = tmp_path / 'model.pth'
    torch.save({}, checkpoint)
    with pytest.raises(ConfigError, match=f'config {checkpoint}: not a config file'):
        compare([ModelSpec('swapped', config=str(checkpoint), checkpoint=TINY_CONFIG)], device='cpu')


def test_model_spec_needs_one_source():
    with pytest.raises(ValueError):
        ModelSpec('neither')
    with pytest.raises(ValueError):
        ModelSpec('both', config='a.py', checkpoint='a.pth', work_dir='run')
