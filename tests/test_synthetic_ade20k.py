"""The synthetic ADE20K: exact ADEChallengeData2016 layout, valid labels, deterministic, and learnable content."""
import glob
import os.path as osp
import runpy
import sys

import cv2
import numpy as np
import pytest

from mmseg_vil.datasets import generate_ade20k
from mmseg_vil.datasets.generator_cli import run_generator_cli

NUM_CLASSES = 8
SIZE = (48, 64)


def _read_split(root, split):
    images, labels = [], []
    for img_path in sorted(glob.glob(osp.join(root, 'images', split, '*.jpg'))):
        ann_path = img_path.replace(osp.join('images', split), osp.join('annotations', split))[:-4] + '.png'
        images.append(cv2.imread(img_path))
        labels.append(cv2.imread(ann_path, cv2.IMREAD_UNCHANGED))
    return images, labels


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
    counts = generate_ade20k(root, num_train=40, num_val=10, size=SIZE, num_classes=NUM_CLASSES, seed=0)
    return root, counts


def test_layout_and_names(dataset):
    root, counts = dataset
    assert counts == {'training': 40, 'validation': 10}
    for split, prefix, count in (('training', 'ADE_train', 40), ('validation', 'ADE_val', 10)):
        images = sorted(osp.basename(p) for p in glob.glob(osp.join(root, 'images', split, '*')))
        annotations = sorted(osp.basename(p) for p in glob.glob(osp.join(root, 'annotations', split, '*')))
        assert images == [f'{prefix}_{i:08d}.jpg' for i in range(1, count + 1)]
        assert annotations == [name[:-4] + '.png' for name in images]


def test_images_and_label_range(dataset):
    root, _ = dataset
    for split in ('training', 'validation'):
        images, labels = _read_split(root, split)
        for image, label in zip(images, labels):
            assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
            assert label.shape == SIZE and label.dtype == np.uint8  # single-channel uint8 PNG
            assert label.max() <= NUM_CLASSES
    _, labels = _read_split(root, 'training')
    values = np.unique(np.concatenate([label.ravel() for label in labels]))
    assert set(values) == set(range(NUM_CLASSES + 1))  # every class and some "other" (0) pixels occur
    assert np.mean([len(np.unique(label)) >= 2 for label in labels]) > 0.8  # scenes, not single-class images


def test_mmseg_reads_it_as_ade20k(dataset):
    from mmengine.registry import DefaultScope
    from mmseg.datasets import ADE20KDataset

    root, _ = dataset
    with DefaultScope.overwrite_default_scope('mmseg'):  # the pipeline's LoadAnnotations must be mmseg's
        ds = ADE20KDataset(
            data_root=root, data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
            pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True)])
    assert len(ds) == 10
    sample = ds[0]
    raw = cv2.imread(ds.get_data_info(0)['seg_map_path'], cv2.IMREAD_UNCHANGED)
    # reduce_zero_label: 0 ("other") -> 255 (ignored), class k -> k - 1
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(sample['gt_seg_map'], expected)


def test_deterministic_given_seed(dataset, tmp_path):
    root, _ = dataset
    again = str(tmp_path / 'same')
    other = str(tmp_path / 'other')
    generate_ade20k(again, num_train=40, num_val=10, size=SIZE, num_classes=NUM_CLASSES, seed=0)
    generate_ade20k(other, num_train=40, num_val=10, size=SIZE, num_classes=NUM_CLASSES, seed=1)
    for split in ('training', 'validation'):
        for path in glob.glob(osp.join(root, '*', split, '*')):
            relative = osp.relpath(path, root)
            with open(path, 'rb') as f, open(osp.join(again, relative), 'rb') as g:
                assert f.read() == g.read(), relative
    _, labels = _read_split(root, 'training')
    _, other_labels = _read_split(other, 'training')
    assert not all(np.array_equal(a, b) for a, b in zip(labels, other_labels))


def _local_colour_features(image):
    """Per-pixel mean and standard deviation of the BGR values in a 7x7 window: colour plus texture energy."""
    image = image.astype(np.float32)
    mean = cv2.blur(image, (7, 7))
    std = np.sqrt(np.maximum(cv2.blur(image * image, (7, 7)) - mean * mean, 0))
    return np.concatenate([mean, std], axis=-1).reshape(-1, 6)


def test_classes_are_learnable_from_appearance(dataset):
    """A nearest-centroid classifier on local colour statistics, fitted on training images, labels validation pixels
    far above chance: the appearance is class dependent, consistent across images and splits, not noise."""
    root, _ = dataset
    train_images, train_labels = _read_split(root, 'training')
    val_images, val_labels = _read_split(root, 'validation')
    x_train = np.concatenate([_local_colour_features(im) for im in train_images])
    y_train = np.concatenate([label.ravel() for label in train_labels])
    x_val = np.concatenate([_local_colour_features(im) for im in val_images])
    y_val = np.concatenate([label.ravel() for label in val_labels])
    classes = np.arange(1, NUM_CLASSES + 1)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in classes])
    labelled = y_val > 0
    distances = ((x_val[labelled, None, :] - centroids[None]) ** 2).sum(-1)
    accuracy = (classes[distances.argmin(1)] == y_val[labelled]).mean()
    assert accuracy > 0.75, accuracy  # chance is 1/8


def test_cli(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / 'cli')
    script = osp.join(osp.dirname(__file__), '..', 'tools', 'generate_ade20k.py')
    monkeypatch.setattr(sys, 'argv', [script, root, '--num-train', '3', '--num-val', '2', '--size', '32', '40'])
    runpy.run_path(script, run_name='__main__')
    assert 'wrote 3 training and 2 validation images' in capsys.readouterr().out
    assert len(glob.glob(osp.join(root, 'images', 'training', '*.jpg'))) == 3
    assert cv2.imread(osp.join(root, 'annotations', 'validation', 'ADE_val_00000002.png')).shape[:2] == (32, 40)


@pytest.mark.parametrize('options, message', [
    (['--num-train', '0'], 'images per split must be at least 1, got [0, 2]'),
    (['--size', '0', '0'], 'size must be at least 1, got [0, 0]'),
    (['--num-classes', '151'], 'num_classes must be in 1..150, got 151'),
])
def test_cli_refuses_bad_options_in_one_line(options, message, tmp_path, monkeypatch, capsys):
    """These used to print 'wrote 0 training ...' with exit status 0, or end in OpenCV's or a ValueError's traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_generator_cli(generate_ade20k, '', '', '', [str(tmp_path / 'new'), '--num-val', '2', *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'new').exists()


def test_cli_writes_over_no_earlier_data(tmp_path, capsys):
    """Pointed at a real ADE20K by mistake, the generator would replace its images with synthetic ones."""
    image = tmp_path / 'images' / 'training' / 'ADE_train_00000001.jpg'
    image.parent.mkdir(parents=True)
    image.write_bytes(b'a real photo')
    with pytest.raises(SystemExit) as exit_info:
        run_generator_cli(generate_ade20k, '', '', '', [str(tmp_path), '--num-train', '1', '--num-val', '1'])
    assert exit_info.value.code == 2
    assert f'{tmp_path} exists and is not an empty folder' in capsys.readouterr().err
    assert image.read_bytes() == b'a real photo'
