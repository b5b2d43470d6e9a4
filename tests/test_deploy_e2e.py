"""Deployment end to end, through the tools as users run them: train, export, segment with ONNX Runtime.

The tiny ViL UperNet of the end-to-end tests (slide inference, 64x64 windows) is trained for four iterations with
tools/train.py on a generated ADE20K-layout folder, exported with tools/deploy/export_onnx.py --dynamic, and the
same images of two sizes (plus a corrupt file) are segmented by tools/infer.py (PyTorch) and by
tools/deploy/infer_onnx.py in a process where torch, MMCV, MMEngine, MMSegmentation and mmseg_vil cannot be
imported. Masks and overlays must agree (see MIN_PIXEL_AGREEMENT).
"""
import json
import os.path as osp
import sys

import cv2
import numpy as np
import pytest
from e2e_helpers import ROOT, TINY_CONFIG, data_root_options, make_ade20k, run_command, run_tool

from mmseg_vil.engine.work_dir import latest_checkpoint

pytest.importorskip('onnxruntime', reason='the deploy extra is not installed: pip install -e .[deploy]')

EXPORT = osp.join(ROOT, 'tools', 'deploy', 'export_onnx.py')
INFER_ONNX = osp.join(ROOT, 'tools', 'deploy', 'infer_onnx.py')
INFER = osp.join(ROOT, 'tools', 'infer.py')
# Pixels whose ONNX Runtime class equals PyTorch's. Both compute the same float32 logits up to ~1e-6; only a pixel
# whose two best classes are that close can flip. Observed: every pixel agrees.
MIN_PIXEL_AGREEMENT = 0.999
# Run a tool with these packages unimportable (an entry None in sys.modules makes `import` raise ImportError).
BLOCKED = ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmseg', 'mmseg_vil', 'mmpretrain')
WITHOUT_TORCH = ('import runpy, sys\n'
                 'sys.modules.update(dict.fromkeys({blocked!r}))\n'
                 'sys.argv = {argv!r}\n'
                 'runpy.run_path(sys.argv[0], run_name="__main__")\n')


# Images of two sizes: 64x64 as trained (one slide window), 80x120 (resized to 64x96: two windows).
IMAGES = {'a.png': (64, 64), 'sub/b.jpg': (80, 120), 'c.png': (80, 120)}


def run_without_torch(argv):
    return run_command([sys.executable, '-c', WITHOUT_TORCH.format(blocked=BLOCKED, argv=argv)])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(config, checkpoint) of the tiny ViL UperNet after four iterations of tools/train.py."""
    folder = tmp_path_factory.mktemp('deploy_train')
    ade_root = make_ade20k(str(folder / 'ADEChallengeData2016'))
    work_dir = str(folder / 'work')
    run_tool(['tools/train.py', TINY_CONFIG, '--work-dir', work_dir, '--cfg-options', *data_root_options(ade_root),
              'train_cfg.val_interval=100'])
    checkpoint = latest_checkpoint(work_dir)
    assert osp.basename(checkpoint) == 'iter_4.pth'
    return TINY_CONFIG, checkpoint


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('deploy_onnx') / 'tiny.onnx')
    log = run_tool([EXPORT, *trained, out, '--dynamic'])
    assert f'wrote {out}: ViL (mLSTM parallel), dynamic height and width' in log
    return out, log


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """The IMAGES, one in a subfolder, and a corrupt file."""
    folder = tmp_path_factory.mktemp('deploy_images')
    rng = np.random.default_rng(0)
    for name, (height, width) in IMAGES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        # Smooth random blobs: regions of several classes rather than per-pixel noise.
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / name), cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC))
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    return folder


def test_export_records_the_check_and_the_pipeline(exported):
    import onnx

    path, log = exported
    assert log.count('verify ') == 3 and 'max |ONNX Runtime - PyTorch|' in log
    properties = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert json.loads(properties['mode']) == 'slide' and json.loads(properties['crop_size']) == [64, 64]
    assert json.loads(properties['resize'])['scale'] == [128, 64]
    assert len(json.loads(properties['classes'])) == 150  # the ADE20K classes the checkpoint was trained with
    check = json.loads(properties['export_check'])
    assert max(check['max_abs_diff'].values()) <= check['tolerance'] == 1e-3


def test_onnx_runtime_masks_equal_pytorch_masks(trained, exported, images, tmp_path):
    torch_dir, onnx_dir = tmp_path / 'torch', tmp_path / 'onnx'
    torch_log = run_tool([INFER, *trained, str(images), '--out-dir', str(torch_dir)])
    onnx_log = run_without_torch([INFER_ONNX, exported[0], str(images), '--out-dir', str(onnx_dir)])
    for log in (torch_log, onnx_log):
        assert '4 images: 3 segmented, 1 failed' in log and f'FAILED {images / "corrupt.png"}' in log

    classes_seen = set()
    for name, shape in IMAGES.items():
        expected = cv2.imread(str(torch_dir / 'pred' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        actual = cv2.imread(str(onnx_dir / 'pred' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        assert actual.shape == expected.shape == shape and actual.dtype == np.uint8
        agree = actual == expected
        assert agree.mean() >= MIN_PIXEL_AGREEMENT, f'{name}: {agree.mean():.5f} of the pixels agree'
        expected_vis = cv2.imread(str(torch_dir / 'vis' / f'{name}.png'))
        actual_vis = cv2.imread(str(onnx_dir / 'vis' / f'{name}.png'))
        np.testing.assert_array_equal(actual_vis[agree], expected_vis[agree])
        classes_seen.update(np.unique(expected).tolist())
    assert len(classes_seen) > 1, 'a constant mask would not test the class decision'


def test_onnx_cli_fails_without_any_segmented_image(exported, images, tmp_path):
    import subprocess

    command = [sys.executable, '-c', WITHOUT_TORCH.format(
        blocked=BLOCKED, argv=[INFER_ONNX, exported[0], str(images / 'corrupt.png'), '--out-dir', str(tmp_path)])]
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 1 and '1 images: 0 segmented, 1 failed' in proc.stdout


def test_export_refused_above_tolerance_writes_nothing(trained, tmp_path):
    import subprocess

    out = tmp_path / 'strict.onnx'
    proc = subprocess.run([sys.executable, EXPORT, *trained, str(out), '--shape', '64', '64', '--tolerance',
                           '1e-12'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 1
    assert 'export refused: the exported logits differ from PyTorch by' in proc.stdout
    assert 'above the tolerance 1e-12; nothing was written' in proc.stdout
    assert not list(tmp_path.iterdir())
