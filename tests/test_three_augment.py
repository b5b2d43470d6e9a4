"""ThreeAugment: exactly one of greyscale / solarize / blur per image, matching PIL's (the official code's) ops."""
import numpy as np
import pytest
from mmengine.registry import DefaultScope
from mmpretrain.registry import TRANSFORMS
from PIL import Image, ImageFilter, ImageOps

from mmseg_vil.datasets.transforms import ThreeAugment


def _image(seed: int = 0) -> np.ndarray:
    """A BGR uint8 image with smooth gradients and noise, so every operation visibly changes it."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:24, 0:32]
    base = np.stack([xs * 8, ys * 10, (xs + ys) * 4], axis=-1)
    return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


def _reference(img_bgr: np.ndarray, operation: str, sigma: float) -> np.ndarray:
    """The official code's ops on the RGB PIL image (torchvision greyscale = PIL 'L'), returned as BGR."""
    rgb = Image.fromarray(np.ascontiguousarray(img_bgr[..., ::-1]))
    if operation == 'greyscale':
        out = rgb.convert('L').convert('RGB')
    elif operation == 'solarize':
        out = ImageOps.solarize(rgb, threshold=128)
    else:
        out = rgb.filter(ImageFilter.GaussianBlur(radius=sigma))
    return np.asarray(out)[..., ::-1]


def test_each_output_is_one_reference_operation_and_all_occur():
    with DefaultScope.overwrite_default_scope('mmpretrain'):  # the registry follows the current default scope
        transform = TRANSFORMS.build(dict(type='ThreeAugment', blur_sigma=(0.1, 2.0)))
    img = _image()
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        out = transform(dict(img=img.copy()))['img']
        np.random.seed(seed)  # replay the transform's draw
        operation, sigma = transform._draw()
        assert 0.1 <= sigma <= 2.0
        assert out.shape == img.shape and out.dtype == np.uint8
        # OpenCV and PIL round the luma differently by at most one level.
        atol = 1 if operation == 'greyscale' else 0
        np.testing.assert_allclose(out, _reference(img, operation, sigma), atol=atol, rtol=0)
        seen.add(operation)
    assert seen == {'greyscale', 'solarize', 'blur'}


def test_choice_is_uniform():
    transform = ThreeAugment()
    np.random.seed(0)
    counts = {}
    for _ in range(3000):
        operation, _ = transform._draw()
        counts[operation] = counts.get(operation, 0) + 1
    assert all(900 < c < 1100 for c in counts.values()), counts


def test_greyscale_weights_follow_the_channel_order():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 255  # pure blue in BGR, pure red in RGB
    np.random.seed(0)
    outputs = {}
    for color_format in ('bgr', 'rgb'):
        transform = ThreeAugment(color_format=color_format)
        while True:  # draw until greyscale is chosen
            state = np.random.get_state()
            if transform._draw()[0] == 'greyscale':
                np.random.set_state(state)
                outputs[color_format] = transform(dict(img=img.copy()))['img']
                break
    # Pillow's 'L' conversion (ITU-R 601-2 luma, 0.299 R + 0.587 G + 0.114 B; tests/data/README.md)
    assert outputs['bgr'][0, 0].tolist() == [29] * 3  # 0.114 * 255
    assert outputs['rgb'][0, 0].tolist() == [76] * 3  # 0.299 * 255


@pytest.mark.parametrize('kwargs,match', [(dict(blur_sigma=(2.0, 0.1)), 'blur_sigma'),
                                          (dict(blur_sigma=(0.0, 1.0)), 'blur_sigma'),
                                          (dict(color_format='hsv'), 'color_format')])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThreeAugment(**kwargs)


def test_rejects_non_colour_images():
    with pytest.raises(ValueError, match=r'uint8 \(H, W, 3\)'):
        ThreeAugment()(dict(img=np.zeros((8, 8), np.uint8)))
