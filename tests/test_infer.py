"""tools/infer.py and mmseg_vil.apis.inference: masks and overlays for a folder with a corrupt file in it.

The model is the tiny ViL UperNet of the end-to-end tests, randomly initialised and saved as a checkpoint with
ADE20K's class names and palette, so the tool loads it exactly as it loads a trained one.
"""
import os.path as osp
import runpy
import sys

import cv2
import numpy as np
import pytest
import torch
from e2e_helpers import ROOT, TINY_CONFIG, run_tool
from mmengine.config import Config

from mmseg_vil.apis import SegmentationWriter, collect_images, init_segmentor, segment_images

INFER = osp.join(ROOT, 'tools', 'infer.py')
GOOD = {'a.jpg': (64, 64), 'sub/b.png': (48, 80), 'sub/c.jpg': (64, 64)}


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
    """(config, checkpoint) of a randomly initialised tiny segmentor."""
    from mmengine.registry import init_default_scope
    from mmseg.datasets import ADE20KDataset
    from mmseg.registry import MODELS

    folder = tmp_path_factory.mktemp('model')
    cfg = Config.fromfile(TINY_CONFIG)
    config_path = str(folder / 'tiny.py')
    cfg.dump(config_path)
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    checkpoint_path = str(folder / 'tiny.pth')
    meta = dict(dataset_meta=dict(classes=ADE20KDataset.METAINFO['classes'],
                                  palette=ADE20KDataset.METAINFO['palette']))
    torch.save(dict(state_dict=model.state_dict(), meta=meta), checkpoint_path)
    return config_path, checkpoint_path


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
    """Three readable images of two sizes (one in a subfolder), a corrupt JPEG and a non-image file."""
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for name, (h, w) in GOOD.items():
        (folder / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
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
    assert [osp.relpath(p, image_dir) for p in found] == ['a.jpg', 'corrupt.jpg', 'sub/b.png', 'sub/c.jpg']
    assert collect_images([str(image_dir / 'sub' / '*.jpg')]) == [str(image_dir / 'sub' / 'c.jpg')]
    assert collect_images([str(image_dir / 'notes.txt')]) == [str(image_dir / 'notes.txt')]  # named: kept
    with pytest.raises(FileNotFoundError):
        collect_images([str(tmp_path / 'missing' / '*.jpg')])


@pytest.mark.parametrize('batch_size', [1, 2])
def test_folder_with_corrupt_file(model, image_dir, tmp_path, batch_size):
    out_dir = tmp_path / 'out'
    writer = SegmentationWriter(model, str(out_dir), opacity=0.6, batch_size=batch_size)
    summary = writer.run(collect_images([str(image_dir)]), progress=False)

    assert set(summary.failures) == {str(image_dir / 'corrupt.jpg')}
    assert 'corrupt' in summary.failures[str(image_dir / 'corrupt.jpg')]
    assert sorted(osp.relpath(p, image_dir) for p in summary.outputs) == sorted(GOOD)
    assert '4 images: 3 segmented, 1 failed' in summary.report()
    palette_bgr = np.asarray(model.dataset_meta['palette'], np.uint8)[:, ::-1]
    for name, (h, w) in GOOD.items():
        stem = osp.splitext(name)[0]
        mask = _read(out_dir / 'pred' / f'{stem}.png')
        vis = _read(out_dir / 'vis' / f'{stem}.png')
        image = _read(image_dir / name)
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and mask.max() < len(palette_bgr)
        # The overlay is the 40/60 blend of the image and the class colours of the mask.
        expected = np.clip(0.4 * image.astype(np.float32) + 0.6 * palette_bgr[mask], 0, 255).astype(np.uint8)
        assert vis.shape == (h, w, 3)
        assert np.abs(vis.astype(int) - expected.astype(int)).max() <= 1


def test_masks_match_mmseg_inference(model, image_dir, tmp_path):
    from mmseg.apis import inference_model

    path = image_dir / 'sub' / 'b.png'
    SegmentationWriter(model, str(tmp_path)).run([str(path)], progress=False)
    expected = inference_model(model, _read(path)).pred_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(_read(tmp_path / 'pred' / 'b.png'), expected)


def test_cli_reports_bad_file_and_succeeds(model_files, image_dir, tmp_path):
    out = run_tool([INFER, *model_files, str(image_dir), '--out-dir', str(tmp_path), '--batch-size', '2'])
    assert '4 images: 3 segmented, 1 failed' in out
    assert f'FAILED {image_dir / "corrupt.jpg"}' in out
    assert osp.isfile(tmp_path / 'vis' / 'sub' / 'c.png') and osp.isfile(tmp_path / 'pred' / 'a.png')


def test_cli_fails_when_every_image_fails(model_files, image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', [INFER, *model_files, str(image_dir / 'corrupt.jpg'), '--out-dir',
                                      str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(INFER, run_name='__main__')
    assert exit_info.value.code == 1
    assert '1 images: 0 segmented, 1 failed' in capsys.readouterr().out


def test_segment_images_end_to_end(model_files, image_dir, tmp_path):
    summary = segment_images(*model_files, [str(image_dir / 'a.jpg')], str(tmp_path), opacity=0.0, progress=False)
    # Opacity 0 leaves the image unchanged.
    np.testing.assert_array_equal(_read(tmp_path / 'vis' / 'a.png'), _read(image_dir / 'a.jpg'))
    assert list(summary.outputs) == [str(image_dir / 'a.jpg')] and not summary.failures
