"""ONNX export (mmseg_vil.deploy) of the demo ViL, DeiT and Vim UperNets, checked in ONNX Runtime against PyTorch.

Each demo segmentor is built from configs/demo with a fixed seed and saved as a checkpoint carrying the demo's
class names and palette, then exported through the same function tools/deploy/export_onnx.py calls. ViL and DeiT
are exported with dynamic height and width and compared at two input sizes the export did not verify; Vim, whose
graph holds for one size, is exported at two fixed sizes. The pre- and post-processing of mmseg_vil_runtime is
compared with MMCV's and PyTorch's, and every refusal is checked for its message.
"""
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from e2e_helpers import ROOT, save_initialized_checkpoint
from mmengine.config import Config

pytest.importorskip('onnxruntime', reason='the deploy extra is not installed: pip install -e .[deploy]')

from mmseg_vil.deploy import (ExportRefused, ShapeGenericAdaptiveAvgPool2d, export_segmentor,  # noqa: E402
                              make_pooling_shape_generic)
from mmseg_vil_runtime import ResizeSpec, SegmentorMetadata  # noqa: E402
from mmseg_vil_runtime.predictor import OnnxSegmentor  # noqa: E402
from mmseg_vil_runtime.transforms import resize_image, resize_logits, slide_windows  # noqa: E402

DEMO = {name: osp.join(ROOT, 'configs', 'demo', f'{name}_demo.py') for name in ('vil', 'deit', 'vim')}
LOGIT_TOL = 1e-4


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp('demo_checkpoints')
    paths = {}
    for name, config in DEMO.items():
        paths[name] = save_initialized_checkpoint(str(folder / f'{name}.pth'), config)
    return paths


def pytorch_logits(config: str, checkpoint: str, inputs: np.ndarray) -> np.ndarray:
    """``EncoderDecoder.encode_decode`` of the model as tools/infer.py builds it."""
    from mmseg_vil.apis import init_segmentor

    model = init_segmentor(config, checkpoint)
    tensor = torch.from_numpy(inputs)
    with torch.no_grad():
        return model.encode_decode(tensor, [dict(img_shape=tensor.shape[2:])]).numpy()


def random_inputs(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, height, width)).astype(np.float32)


@pytest.mark.parametrize('name', ['vil', 'deit'])
def test_dynamic_export_matches_pytorch_at_two_sizes(name, checkpoints, tmp_path, capsys):
    out = str(tmp_path / f'{name}.onnx')
    report = export_segmentor(DEMO[name], checkpoints[name], out, dynamic=True)
    printed = capsys.readouterr().out
    assert len(report.differences) == 3 and max(report.differences.values()) <= 1e-3
    assert all(f'verify {size}: max |ONNX Runtime - PyTorch|' in printed for size in report.differences)

    segmentor = OnnxSegmentor(out)
    meta = segmentor.meta
    cfg = Config.fromfile(DEMO[name])
    assert meta.input_size is None and meta.min_input_size == 17
    checkpoint_meta = torch.load(checkpoints[name], weights_only=True)['meta']['dataset_meta']
    assert meta.classes == list(checkpoint_meta['classes']) and meta.palette == checkpoint_meta['palette']
    assert meta.mean == cfg.model.data_preprocessor.mean and meta.bgr_to_rgb
    assert meta.resize == ResizeSpec(scale=[512, 128], scale_factor=None, keep_ratio=True, interpolation='bilinear')
    assert meta.mode == 'whole' and meta.config == DEMO[name] and meta.opset >= 18
    assert set(meta.versions) >= {'torch', 'onnx', 'onnxruntime', 'onnxscript', 'mmsegmentation', 'mmseg_vil'}
    assert meta.backbone == ('ViL (mLSTM parallel)' if name == 'vil' else 'VisionTransformer')
    for size in [(128, 128), (96, 176)]:  # neither was verified at export (128x128 is the pos-embed grid)
        inputs = random_inputs(*size)
        expected = pytorch_logits(DEMO[name], checkpoints[name], inputs)
        actual = segmentor.logits(inputs)
        assert actual.shape == expected.shape == (1, 8, *size)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=LOGIT_TOL)

    # Whole images through the runtime's resize, normalisation and final resize, against mmseg's inference_model.
    from mmseg.apis import inference_model

    from mmseg_vil.apis import init_segmentor

    model = init_segmentor(DEMO[name], checkpoints[name])
    for shape in [(100, 150), (128, 128)]:
        image = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
        expected = inference_model(model, image).pred_sem_seg.data[0].numpy()
        mask = segmentor.segment(image)
        assert mask.shape == shape and mask.dtype == np.uint8
        assert (mask == expected).mean() >= 0.999


def test_chunkwise_vil_export_matches_pytorch(checkpoints, tmp_path):
    """The chunkwise mLSTM form, which 'auto' exports for graphs above 256 patches, has an ONNX form: 81 patches,
    two chunks and a padded step, against PyTorch's own choice (the parallel form)."""
    out = str(tmp_path / 'vil_chunkwise.onnx')
    report = export_segmentor(DEMO['vil'], checkpoints['vil'], out, size=(144, 144), mlstm_backend='chunkwise')
    assert max(report.differences.values()) <= 1e-3
    segmentor = OnnxSegmentor(out)
    assert segmentor.meta.backbone == 'ViL (mLSTM chunkwise)'
    inputs = random_inputs(144, 144)
    np.testing.assert_allclose(segmentor.logits(inputs), pytorch_logits(DEMO['vil'], checkpoints['vil'], inputs),
                               rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize('size', [(64, 80), (96, 64)])
def test_vim_fixed_size_export_matches_pytorch(size, checkpoints, tmp_path):
    out = str(tmp_path / 'vim.onnx')
    report = export_segmentor(DEMO['vim'], checkpoints['vim'], out, size=size)
    assert list(report.differences) == ['{}x{}'.format(*size)]
    segmentor = OnnxSegmentor(out)
    assert segmentor.meta.input_size == list(size)
    inputs = random_inputs(*size)
    np.testing.assert_allclose(segmentor.logits(inputs), pytorch_logits(DEMO['vim'], checkpoints['vim'], inputs),
                               rtol=0, atol=LOGIT_TOL)
    with pytest.raises(ValueError, match=r'exported for \d+x\d+ only; export with --dynamic'):
        segmentor.logits(random_inputs(size[1] + 16, size[0]))


def write_config(tmp_path, base: str, text: str) -> str:
    path = tmp_path / 'variant.py'
    path.write_text(f"_base_ = ['{base}']\n{text}\n")
    return str(path)


@pytest.mark.parametrize('case, match', [
    (dict(mlstm_backend='fused'), r"mlstm_backend='fused' cannot be exported: its Triton kernels"),
    (dict(mlstm_backend='fused_chunkwise'), r"mlstm_backend='fused_chunkwise' cannot be exported: its Triton"),
    (dict(mlstm_backend='quadratic'), r"mlstm_backend='quadratic' cannot be exported: there is no such backend"),
    (dict(model='vim', dynamic=True), r'Vim cannot be exported with dynamic height and width'),
    (dict(model='deit', mlstm_backend='parallel'), r'--mlstm-backend parallel applies to ViL only'),
    (dict(config="test_pipeline = [dict(type='LoadImageFromFile'), dict(type='RandomFlip', prob=1.0), "
                  "dict(type='PackSegInputs')]"), r"test_pipeline transform 'RandomFlip' is not reproduced"),
    (dict(config="model = dict(data_preprocessor=dict(test_cfg=dict(size_divisor=32)))"),
     r'data_preprocessor.test_cfg=.*test-time padding'),
    (dict(config="model = dict(test_cfg=dict(mode='tta'))"), r"test_cfg.mode='tta'"),
    (dict(config="test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(64, 64), "
                  "backend='pillow'), dict(type='PackSegInputs')]"), r"Resize with backend='pillow'"),
])
def test_refusals_name_the_cause_and_write_nothing(case, match, checkpoints, tmp_path):
    model = case.get('model', 'vil')
    config = DEMO[model]
    if 'config' in case:
        config = write_config(tmp_path, config, case['config'])
    out = tmp_path / 'refused.onnx'
    with pytest.raises(ExportRefused, match=match):
        export_segmentor(config, checkpoints[model], str(out), dynamic=case.get('dynamic', False),
                         mlstm_backend=case.get('mlstm_backend', 'auto'))
    assert not out.exists() and not list(tmp_path.glob('*.onnx*'))


def test_checkpoint_without_palette_is_refused(tmp_path):
    path = save_initialized_checkpoint(str(tmp_path / 'no_meta.pth'), DEMO['deit'])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['meta']['dataset_meta']['palette'] = checkpoint['meta']['dataset_meta']['palette'][:5]
    torch.save(checkpoint, path)
    with pytest.raises(ExportRefused, match='predicts 8 classes but its dataset_meta has 5 palette colours'):
        export_segmentor(DEMO['deit'], path, str(tmp_path / 'x.onnx'))


def test_foreign_onnx_file_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'identity',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])])
    path = str(tmp_path / 'identity.onnx')
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)]), path)
    with pytest.raises(ValueError, match='is not a segmentor exported by tools/deploy/export_onnx.py'):
        OnnxSegmentor(path)


def test_file_that_is_no_onnx_model_is_named(tmp_path):
    """ONNX Runtime's InvalidProtobuf used to end tools/deploy/infer_onnx.py with a traceback."""
    path = tmp_path / 'model.pth'
    torch.save({}, path)
    with pytest.raises(ValueError, match=f'{path} cannot be loaded by ONNX Runtime .*; pass the .onnx file written'):
        OnnxSegmentor(str(path))


@pytest.mark.parametrize('out', ['config', 'folder'])
def test_output_that_is_no_onnx_file_name_is_refused_before_tracing(out, tmp_path, monkeypatch):
    """Naming the config as the output used to replace it with the ONNX graph (exit status 0); a folder failed
    only after tracing and verification, leaving a .partial file beside it."""
    config, text = tmp_path / 'model.py', f"_base_ = ['{DEMO['deit']}']\n"
    config.write_text(text)
    monkeypatch.setattr('mmseg_vil.deploy.export.init_segmentor', None)  # any model building would fail loudly
    with pytest.raises(ExportRefused, match='is not an .onnx file name: the arguments are CONFIG CHECKPOINT OUT.onnx'):
        export_segmentor(str(config), 'model.pth', str(config if out == 'config' else tmp_path))
    assert config.read_text() == text and [path.name for path in tmp_path.iterdir()] == ['model.py']


@pytest.mark.parametrize('input_size', [(7, 9), (12, 12), (13, 6), (2, 30)])
@pytest.mark.parametrize('output_size', [(1, 1), (2, 3), (6, 6)])
def test_shape_generic_pooling_equals_adaptive_avg_pool(input_size, output_size):
    x = torch.randn(2, 3, *input_size, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(x, output_size)
    torch.testing.assert_close(ShapeGenericAdaptiveAvgPool2d(output_size)(x), expected, rtol=0, atol=1e-12)


def test_pooling_substitution_replaces_every_adaptive_pool():
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(3), torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1)))
    assert make_pooling_shape_generic(model) == 2
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules())


@pytest.mark.parametrize('spec', [
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='Resize', scale=(100, 60), keep_ratio=False),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True, interpolation='bicubic'),
    dict(type='Resize', scale_factor=0.7, keep_ratio=True),
])
@pytest.mark.parametrize('shape', [(128, 128), (75, 201), (333, 97)])
def test_resize_is_mmcvs(spec, shape):
    from mmseg.registry import TRANSFORMS

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = TRANSFORMS.build(dict(spec))(dict(img=image.copy()))['img']
    resize = ResizeSpec(scale=list(spec['scale']) if 'scale' in spec else None,
                        scale_factor=[spec['scale_factor']] * 2 if 'scale_factor' in spec else None,
                        keep_ratio=spec['keep_ratio'], interpolation=spec.get('interpolation', 'bilinear'))
    np.testing.assert_array_equal(resize_image(image, resize), expected)


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('sizes', [((16, 20), (64, 80)), ((33, 17), (128, 61)), ((40, 40), (23, 31)), ((5, 7), (5, 7))])
def test_logit_resize_is_pytorchs_bilinear(align_corners, sizes):
    source, target = sizes
    logits = torch.randn(1, 6, *source)
    expected = F.interpolate(logits, size=target, mode='bilinear', align_corners=align_corners)[0].numpy()
    actual = resize_logits(logits[0].numpy(), target, align_corners)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_slide_windows_cover_the_image_like_mmseg():
    windows = list(slide_windows(100, 64, crop=(64, 64), stride=(43, 43)))
    assert windows == [(0, 64, 0, 64), (36, 100, 0, 64)]
    assert list(slide_windows(40, 50, crop=(64, 64), stride=(43, 43))) == [(0, 40, 0, 50)]  # smaller image


def test_metadata_round_trip():
    meta = SegmentorMetadata(
        config='c.py', checkpoint='w.pth', classes=['a', 'b'], palette=[[1, 2, 3], [4, 5, 6]], mean=[1.0, 2.0, 3.0],
        std=[4.0, 5.0, 6.0], bgr_to_rgb=True, resize=ResizeSpec([512, 128], None, True, 'bilinear'), mode='slide',
        crop_size=[64, 64], stride=[43, 43], align_corners=False, input_size=None, min_input_size=64, opset=20,
        versions={'torch': 'x'}, backbone='ViL (mLSTM parallel)', export_check={'tolerance': 1e-3})
    assert SegmentorMetadata.from_properties(meta.to_properties(), 'm.onnx') == meta
    properties = meta.to_properties()
    del properties['palette']
    with pytest.raises(ValueError, match=r"m.onnx: metadata lacks \['palette'\]"):
        SegmentorMetadata.from_properties(properties, 'm.onnx')


def test_unreadable_files_get_a_reason(tmp_path):
    from mmseg_vil_runtime.files import read_image

    (tmp_path / 'empty.png').write_bytes(b'')
    (tmp_path / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a JPEG')
    assert read_image(str(tmp_path / 'empty.png')) == (None, 'empty file (0 bytes)')
    assert read_image(str(tmp_path / 'corrupt.jpg'))[1].startswith('not a readable image')
    image, reason = read_image(str(tmp_path / 'missing.png'))
    assert image is None and reason == 'cannot be read (No such file or directory)'


def test_op_without_onnx_form_is_refused_by_name():
    """A segmentor whose features need ``aten.median`` (no ONNX translation) is refused with the op's name."""
    from torch import nn

    from mmseg_vil.deploy import trace_segmentor

    class MedianSegmentor(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Identity()
            self.decode_head = nn.Conv2d(3, 2, 1)
            self.decode_head.align_corners = False

        def extract_feat(self, x):
            return x - x.median(dim=-1, keepdim=True).values

    with pytest.raises(ExportRefused, match=r'Identity segmentor could not be exported: .*aten\.median'):
        trace_segmentor(MedianSegmentor().eval(), (8, 8))


def test_auto_mlstm_form_follows_the_largest_input():
    from mmseg_vil.deploy import choose_mlstm_backend
    from mmseg_vil.deploy.describe import largest_input, patch_grid

    slide = dict(mode='slide', crop_size=[512, 512])
    whole = dict(mode='whole')
    demo_resize = ResizeSpec(scale=[512, 128], scale_factor=None, keep_ratio=True, interpolation='bilinear')
    assert largest_input(None, slide) == (512, 512) and largest_input(None, whole) is None
    assert patch_grid(largest_input(demo_resize, whole), 16) == 256
    assert choose_mlstm_backend('auto', 256) == 'parallel'  # the demo: up to 32x8 patches
    assert choose_mlstm_backend('auto', patch_grid((512, 512), 16)) == 'chunkwise'
    assert choose_mlstm_backend('auto', None) == 'chunkwise'
    assert choose_mlstm_backend('chunkwise', 16) == 'chunkwise'
