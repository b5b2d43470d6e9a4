"""The synthetic Cityscapes: the file names and city folders mmseg's CityscapesDataset pairs, train-id labels, and the
same scenes as the synthetic ADE20K (one synthesis, two layouts)."""
import glob
import os.path as osp
import runpy
import sys

import cv2
import numpy as np
import pytest

from mmseg_vil.datasets import generate_ade20k, generate_cityscapes, synthetic_ade20k, synthetic_cityscapes
from mmseg_vil.datasets.synthetic_scenes import save_image

NUM_CLASSES = 6
SIZE = (32, 64)
NUM_TRAIN, NUM_VAL = 7, 3


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('cityscapes'))
    counts = generate_cityscapes(root, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, num_classes=NUM_CLASSES)
    assert counts == {'train': NUM_TRAIN, 'val': NUM_VAL}
    return root


def relative_files(root: str, folder: str):
    return sorted(osp.relpath(p, osp.join(root, folder)) for p in glob.glob(osp.join(root, folder, '**', '*.png'),
                                                                           recursive=True))


def test_layout_and_names(root):
    images = relative_files(root, 'leftImg8bit')
    expected_train = [f'train/{city}/{city}_{seq:06d}_000019_leftImg8bit.png'
                      for city, seq in [('aachen', 0), ('aachen', 1), ('aachen', 2), ('bremen', 0), ('bremen', 1),
                                        ('zurich', 0), ('zurich', 1)]]
    expected_val = [f'val/{city}/{city}_000000_000019_leftImg8bit.png' for city in ('frankfurt', 'lindau', 'munster')]
    assert images == expected_train + expected_val
    assert relative_files(root, 'gtFine') == [name.replace('_leftImg8bit.png', '_gtFine_labelTrainIds.png')
                                              for name in images]


def test_labels_are_train_ids(root):
    labels = [cv2.imread(osp.join(root, 'gtFine', name), cv2.IMREAD_UNCHANGED) for name in relative_files(root, 'gtFine')]
    for label in labels:
        assert label.shape == SIZE and label.dtype == np.uint8  # single-channel uint8 PNG
    values = set(np.unique(np.concatenate([label.ravel() for label in labels])).tolist())
    assert values == set(range(NUM_CLASSES)) | {255}  # every train id used, and some ignored pixels
    image = cv2.imread(osp.join(root, 'leftImg8bit', relative_files(root, 'leftImg8bit')[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (*SIZE, 3) and image.dtype == np.uint8


def test_same_scenes_as_the_synthetic_ade20k(root, tmp_path):
    """With the same seed, size and classes both layouts hold the same scenes: ADE label k is train id k - 1 and ADE's
    "other" (0) is Cityscapes' ignored 255; the PNG images, JPEG-encoded as the ADE writer does, are ADE's files."""
    ade = str(tmp_path / 'ade')
    generate_ade20k(ade, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, num_classes=NUM_CLASSES)
    for ade_split, split, count in (('training', 'train', NUM_TRAIN), ('validation', 'val', NUM_VAL)):
        for index in range(count):
            ade_image, ade_label = synthetic_ade20k.sample_paths(ade, ade_split, index)
            image, label = synthetic_cityscapes.sample_paths(root, split, index)
            ade_label, label = (cv2.imread(p, cv2.IMREAD_UNCHANGED) for p in (ade_label, label))
            np.testing.assert_array_equal(label, np.where(ade_label == 0, 255, ade_label.astype(int) - 1))
            with open(ade_image, 'rb') as f:
                assert cv2.imencode('.jpg', cv2.imread(image), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() == f.read()


def test_mmseg_reads_it_as_cityscapes(root):
    from mmengine.registry import DefaultScope
    from mmseg.datasets import CityscapesDataset

    with DefaultScope.overwrite_default_scope('mmseg'):  # the pipeline's LoadAnnotations must be mmseg's
        dataset = CityscapesDataset(
            data_root=root, data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
            pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')])
    assert len(dataset) == NUM_TRAIN
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample['img_path'].replace('leftImg8bit', 'gtFine', 1).replace(
            '_leftImg8bit.png', '_gtFine_labelTrainIds.png') == sample['seg_map_path']
        np.testing.assert_array_equal(sample['gt_seg_map'], cv2.imread(sample['seg_map_path'], cv2.IMREAD_UNCHANGED))


def test_refuses_more_classes_than_cityscapes_has(tmp_path):
    with pytest.raises(ValueError, match=r'num_classes must be in 1\.\.19, got 20'):
        generate_cityscapes(str(tmp_path), num_train=1, num_val=1, size=SIZE, num_classes=20)


def test_unwritable_image_path_is_an_error(tmp_path):
    folder = tmp_path / 'taken.png'
    folder.mkdir()  # a folder where the image should go
    with pytest.raises(OSError, match='could not write .*taken.png'):
        save_image(str(folder), np.zeros((4, 4), np.uint8))


def test_cli(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'cli')
    script = osp.join(osp.dirname(__file__), '..', 'tools', 'generate_cityscapes.py')
    monkeypatch.setattr(sys, 'argv', [script, out, '--num-train', '2', '--num-val', '1', '--size', '16', '32',
                                      '--num-classes', '19'])
    runpy.run_path(script, run_name='__main__')
    assert 'wrote 2 training and 1 validation images' in capsys.readouterr().out
    label = cv2.imread(osp.join(out, 'gtFine', 'val', 'frankfurt', 'frankfurt_000000_000019_gtFine_labelTrainIds.png'),
                       cv2.IMREAD_UNCHANGED)
    assert label.shape == (16, 32)
