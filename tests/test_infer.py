"""tools/infer.py and mmseg_vil.apis.inference: masks and overlays for a folder with bad files in it.

The model is the tiny ViL UperNet of the end-to-end tests, randomly initialised and saved as a checkpoint with
ADE20K's class names and palette, so the tool loads it exactly as it loads a trained one.
"""
import os
import os.path as osp
import runpy
import sys

import cv2
import numpy as np
import pytest
import torch
from e2e_helpers import ROOT, TINY_CONFIG, run_tool, save_initialized_checkpoint
from mmengine.config import Config
from mmseg.datasets import ADE20KDataset

from mmseg_vil.apis import (SegmentationWriter, collect_images, init_segmentor, read_image, resolve_device,
                            segment_images)
from mmseg_vil.utils.checkpoint import CheckpointMismatchError

INFER = osp.join(ROOT, 'tools', 'infer.py')
# Two images of one folder differ only in their extension: their outputs must not collide.
GOOD = {'a.jpg': (64, 64), 'a.png': (32, 48), 'sub/b.png': (48, 80), 'sub/c.jpg': (64, 64)}
BAD = {'corrupt.jpg': 'not a readable image', 'empty.png': 'empty file (0 bytes)'}


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
    """(config, checkpoint) of a randomly initialised tiny segmentor."""
    folder = tmp_path_factory.mktemp('model')
    config_path = str(folder / 'tiny.py')
    Config.fromfile(TINY_CONFIG).dump(config_path)
    return config_path, save_initialized_checkpoint(str(folder / 'tiny.pth'), config_path)


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
    """Four readable images of three sizes (two in a subfolder), a corrupt JPEG, an empty PNG and a text file."""
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for name, (h, w) in GOOD.items():
        (folder / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
    (folder / 'empty.png').write_bytes(b'')
    (folder / 'notes.txt').write_text('not an image, ignored when scanning a folder')
    return folder


@pytest.fixture(scope='module')
def model(model_files):
    return init_segmentor(*model_files, device='cpu')


def _read(path):
    """An image as the tool reads it (OpenCV, BGR; masks unchanged)."""
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_collect_images(image_dir, tmp_path):
    found = collect_images([str(image_dir)])
    assert [osp.relpath(p, image_dir) for p in found] == sorted([*GOOD, *BAD])
    assert collect_images([str(image_dir / 'sub' / '*.jpg')]) == [str(image_dir / 'sub' / 'c.jpg')]
    assert collect_images([str(image_dir / 'notes.txt')]) == [str(image_dir / 'notes.txt')]  # named: kept
    with pytest.raises(FileNotFoundError):
        collect_images([str(tmp_path / 'missing' / '*.jpg')])


def test_read_image_names_the_reason(image_dir, tmp_path):
    image, reason = read_image(str(image_dir / 'a.png'))
    assert image.shape == (32, 48, 3) and reason is None
    for name, expected in BAD.items():
        image, reason = read_image(str(image_dir / name))
        assert image is None and expected in reason
    assert read_image(str(tmp_path / 'missing.png'))[1].startswith('cannot be read (No such file')
    assert read_image(str(tmp_path))[1].startswith('cannot be read')  # a folder


def _expected_outputs(out_dir, name):
    return out_dir / 'pred' / f'{name}.png', out_dir / 'vis' / f'{name}.png'


@pytest.mark.parametrize('batch_size', [1, 2])
def test_folder_with_bad_files(model, image_dir, tmp_path, batch_size):
    out_dir = tmp_path / 'out'
    writer = SegmentationWriter(model, str(out_dir), opacity=0.6, batch_size=batch_size)
    summary = writer.run(collect_images([str(image_dir)]), progress=False)

    assert {osp.relpath(p, image_dir): reason for p, reason in summary.failures.items()}.keys() == BAD.keys()
    for name, reason in BAD.items():
        assert reason in summary.failures[str(image_dir / name)]
    assert sorted(osp.relpath(p, image_dir) for p in summary.outputs) == sorted(GOOD)
    assert '6 images: 4 segmented, 2 failed' in summary.report()
    palette_bgr = np.asarray(model.dataset_meta['palette'], np.uint8)[:, ::-1]
    written = {osp.relpath(osp.join(folder, f), out_dir) for folder, _, files in os.walk(out_dir) for f in files}
    assert written == {osp.join(kind, f'{name}.png') for kind in ('pred', 'vis') for name in GOOD}
    for name, (h, w) in GOOD.items():
        mask_path, vis_path = _expected_outputs(out_dir, name)
        assert summary.outputs[str(image_dir / name)] == (str(mask_path), str(vis_path))
        mask, vis, image = _read(mask_path), _read(vis_path), _read(image_dir / name)
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and mask.max() < len(palette_bgr)
        # The overlay is the 40/60 blend of the image and the class colours of the mask.
        expected = np.clip(0.4 * image.astype(np.float32) + 0.6 * palette_bgr[mask], 0, 255).astype(np.uint8)
        assert vis.shape == (h, w, 3)
        assert np.abs(vis.astype(int) - expected.astype(int)).max() <= 1


def test_masks_have_the_size_of_their_images(model, tmp_path, monkeypatch):
    """Each prediction has its image's height and width, checked on the mask itself: the overlay is replaced by a
    recorder, so a wrongly sized mask cannot surface as a blending error instead."""
    from mmseg_vil.apis import inference
    sizes = {'odd.png': (37, 101), 'square.png': (64, 64)}  # 37 x 101: no multiple of the patch or crop size
    rng = np.random.default_rng(1)
    for name, size in sizes.items():
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    seen = []
    monkeypatch.setattr(inference, 'overlay', lambda image, mask, *_: seen.append((image.shape, mask.shape)) or image)
    summary = SegmentationWriter(model, str(tmp_path / 'out')).run(
        [str(tmp_path / name) for name in sizes], progress=False)
    assert sorted(seen) == sorted(((*size, 3), size) for size in sizes.values())
    assert not summary.failures
    for name, size in sizes.items():
        mask_path, _ = summary.outputs[str(tmp_path / name)]
        assert _read(mask_path).shape == size


def test_masks_match_mmseg_inference(model, image_dir, tmp_path):
    from mmseg.apis import inference_model

    path = image_dir / 'sub' / 'b.png'
    SegmentationWriter(model, str(tmp_path)).run([str(path)], progress=False)
    expected = inference_model(model, _read(path)).pred_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(_read(tmp_path / 'pred' / 'b.png.png'), expected)


def test_cli_reports_bad_files_and_succeeds(model_files, image_dir, tmp_path):
    out = run_tool([INFER, *model_files, str(image_dir), '--out-dir', str(tmp_path), '--batch-size', '2',
                    '--device', 'cpu'])
    assert '6 images: 4 segmented, 2 failed' in out
    assert f'FAILED {image_dir / "corrupt.jpg"}: not a readable image' in out
    assert f'FAILED {image_dir / "empty.png"}: empty file (0 bytes)' in out
    assert osp.isfile(tmp_path / 'vis' / 'sub' / 'c.jpg.png') and osp.isfile(tmp_path / 'pred' / 'a.png.png')


def _run_infer(monkeypatch, *argv):
    """tools/infer.py in this process; returns its exit status."""
    monkeypatch.setattr(sys, 'argv', [INFER, *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(INFER, run_name='__main__')
    return exit_info.value.code


def test_cli_fails_when_every_image_fails(model_files, image_dir, tmp_path, monkeypatch, capsys):
    assert _run_infer(monkeypatch, *model_files, image_dir / 'corrupt.jpg', '--out-dir', tmp_path) == 1
    assert '1 images: 0 segmented, 1 failed' in capsys.readouterr().out


@pytest.mark.parametrize('option, message', [
    (['--opacity', '2'], '--opacity must be in [0, 1], got 2.0'),
    (['--batch-size', '0'], '--batch-size must be at least 1, got 0'),
    (['--device', 'gpu'], "--device 'gpu' is not a device name"),
])
def test_cli_rejects_bad_options_before_loading(model_files, image_dir, tmp_path, monkeypatch, capsys, option, message):
    monkeypatch.setattr('mmseg_vil.apis.inference.init_model', None)  # any model building would fail loudly
    assert _run_infer(monkeypatch, *model_files, image_dir, '--out-dir', tmp_path / 'out', *option) == 2
    assert message in capsys.readouterr().err
    assert not osp.exists(tmp_path / 'out')


@pytest.mark.parametrize('config, message', [
    ('checkpoint', 'not a config file (.py, .json, .yaml, .yml); give the config first, then the checkpoint'),
    (osp.join(ROOT, 'configs', 'classification', 'vil-t16_8xb256-800e_in1k-192px.py'),
     'is a classification config (its model has no decode_head), where a segmentation config is needed'),
    (osp.join(ROOT, 'configs', '_base_', 'datasets', 'ade20k.py'), 'defines no model (a _base_ fragment?)'),
])
def test_cli_rejects_a_config_of_another_kind_before_loading(model_files, image_dir, tmp_path, monkeypatch, capsys,
                                                             config, message):
    """These used to end in MMEngine's tracebacks (OSError, AttributeError) or a checkpoint mismatch."""
    monkeypatch.setattr('mmseg_vil.apis.inference.init_model', None)  # any model building would fail loudly
    config = model_files[1] if config == 'checkpoint' else config
    assert _run_infer(monkeypatch, config, model_files[1], image_dir, '--out-dir', tmp_path / 'out') == 2
    assert message in capsys.readouterr().err
    assert not osp.exists(tmp_path / 'out')


def test_inputs_without_images_or_among_the_results_are_refused(model_files, tmp_path, monkeypatch, capsys):
    """An empty folder used to load the model and end with '0 images'; a second run into an input folder segmented
    the first run's results as inputs (and could write a result over an input)."""
    monkeypatch.setattr('mmseg_vil.apis.inference.init_model', None)
    (tmp_path / 'empty').mkdir()
    assert _run_infer(monkeypatch, *model_files, tmp_path / 'empty', '--out-dir', tmp_path / 'out') == 2
    assert f"'{tmp_path / 'empty'}' is a folder without images (.jpg" in capsys.readouterr().err
    photos = tmp_path / 'photos'
    (photos / 'pred').mkdir(parents=True)
    for name in ('a.png', 'pred/a.png.png'):  # an image and the mask an earlier run wrote next to it
        cv2.imwrite(str(photos / name), np.zeros((8, 8, 3), np.uint8))
    assert _run_infer(monkeypatch, *model_files, photos, '--out-dir', photos) == 2
    assert f'input {photos / "pred" / "a.png.png"} is inside {photos / "pred"}, where the results are written' in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match='where the results are written'):
        segment_images(*model_files, [str(photos)], str(photos), device='cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only machine')
def test_device_defaults_to_cuda_when_present(model_files, image_dir, tmp_path, monkeypatch, capsys):
    assert resolve_device(None) == 'cpu'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert resolve_device(None) == 'cuda'
    monkeypatch.undo()
    assert _run_infer(monkeypatch, *model_files, image_dir, '--out-dir', tmp_path, '--device', 'cuda:0') == 2
    assert '--device cuda:0: CUDA is not available here; use --device cpu' in capsys.readouterr().err


def test_cli_cfg_options_reach_the_model(model_files, image_dir, tmp_path, monkeypatch):
    """The 150-class checkpoint does not fit a 7-class model: the override was applied, and the tool stops."""
    message = _run_infer(monkeypatch, *model_files, image_dir, '--out-dir', tmp_path / 'out', '--cfg-options',
                         'model.decode_head.num_classes=7')  # sys.exit(message): exit status 1
    assert message.startswith('infer.py: error: ')
    assert 'decode_head.conv_seg.weight (150, 16, 1, 1) vs model (7, 16, 1, 1)' in message
    assert 'decode_head: 150 in the checkpoint, 7 in the config' in message
    assert not osp.exists(tmp_path / 'out')


def test_segment_images_end_to_end(model_files, image_dir, tmp_path):
    summary = segment_images(*model_files, [str(image_dir / 'a.jpg')], str(tmp_path), opacity=0.0, progress=False,
                             device='cpu')
    # Opacity 0 leaves the image unchanged.
    np.testing.assert_array_equal(_read(tmp_path / 'vis' / 'a.jpg.png'), _read(image_dir / 'a.jpg'))
    assert list(summary.outputs) == [str(image_dir / 'a.jpg')] and not summary.failures


def test_checkpoint_without_dataset_meta_takes_the_config_classes(model_files, tmp_path):
    bare = tmp_path / 'bare.pth'
    torch.save(torch.load(model_files[1], weights_only=True)['state_dict'], bare)
    model = init_segmentor(model_files[0], str(bare), device='cpu')
    assert model.dataset_meta['classes'] == ADE20KDataset.METAINFO['classes']
    with pytest.raises(CheckpointMismatchError, match='records no class names'):
        init_segmentor(model_files[0], str(bare), device='cpu', cfg_options={'model.decode_head.num_classes': 7},
                       allow_partial=True)
