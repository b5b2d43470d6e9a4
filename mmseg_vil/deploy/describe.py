"""Read from a segmentor and its config what inference around the graph does, or refuse what cannot travel.

``mmseg.apis.inference_model`` (behind ``tools/infer.py``) runs the config's ``test_pipeline``, the model's
``SegDataPreProcessor`` and ``EncoderDecoder.inference`` ('whole' or 'slide'). An exported file must reproduce them
without the config, so each is translated into :class:`~mmseg_vil_runtime.metadata.SegmentorMetadata` fields, and
anything the runtime does not reproduce is refused by name here, before tracing.
"""
import math
from typing import Dict, List, Optional, Tuple

from mmengine.config import Config
from torch import nn

from mmseg_vil_runtime.metadata import ResizeSpec
from mmseg_vil_runtime.transforms import CV2_INTERPOLATIONS

from .errors import ExportRefused

# Test-pipeline transforms that need nothing at run time: loading is done by the runtime, annotations are dropped
# by inference_model, packing is layout.
PASSIVE_TRANSFORMS = {'LoadImageFromFile', 'LoadImageFromNDArray', 'LoadAnnotations', 'PackSegInputs'}


def _type_name(transform: dict) -> str:
    kind = transform.get('type')
    return kind if isinstance(kind, str) else getattr(kind, '__name__', repr(kind))


def _resize_spec(transform: dict) -> ResizeSpec:
    backend = transform.get('backend', 'cv2')
    interpolation = transform.get('interpolation', 'bilinear')
    if backend != 'cv2':
        raise ExportRefused(f"test_pipeline Resize with backend={backend!r}: only OpenCV ('cv2') resizing is "
                            'reproduced by the ONNX runtime')
    if interpolation not in CV2_INTERPOLATIONS:
        raise ExportRefused(f'test_pipeline Resize with interpolation={interpolation!r}: choose one of '
                            f'{sorted(CV2_INTERPOLATIONS)}')
    scale, factor = transform.get('scale'), transform.get('scale_factor')
    if scale is None and factor is None:
        raise ExportRefused('test_pipeline Resize has neither scale nor scale_factor')
    scale = None if scale is None else [scale, scale] if isinstance(scale, int) else [int(s) for s in scale]
    factor = None if factor is None else [factor, factor] if isinstance(factor, (int, float)) else list(factor)
    return ResizeSpec(scale=scale, scale_factor=None if scale else [float(f) for f in factor],
                      keep_ratio=bool(transform.get('keep_ratio', False)), interpolation=interpolation)


def describe_test_pipeline(cfg: Config) -> Optional[ResizeSpec]:
    """The test pipeline's resize (None if it has none); refuse transforms the runtime does not reproduce."""
    pipeline = cfg.get('test_pipeline')
    if not pipeline:
        raise ExportRefused(f'{cfg.filename}: no test_pipeline; inference (tools/infer.py too) builds its '
                            'preprocessing from it')
    resize = None
    for transform in pipeline:
        name = _type_name(transform)
        if name in PASSIVE_TRANSFORMS:
            if transform.get('to_float32'):
                raise ExportRefused(f'test_pipeline {name} with to_float32=True is not reproduced by the runtime')
        elif name == 'Resize' and resize is None:
            resize = _resize_spec(transform)
        else:
            raise ExportRefused(f'test_pipeline transform {name!r} is not reproduced by the ONNX runtime (it '
                                f'supports {sorted(PASSIVE_TRANSFORMS)} and one Resize); remove it for export')
    return resize


def describe_preprocessor(cfg: Config) -> Dict[str, object]:
    """``mean``, ``std`` and ``bgr_to_rgb`` of the model's ``SegDataPreProcessor``."""
    preprocessor = cfg.model.get('data_preprocessor') or {}
    kind = preprocessor.get('type', 'SegDataPreProcessor')
    if kind != 'SegDataPreProcessor':
        raise ExportRefused(f'data_preprocessor {kind!r}: only SegDataPreProcessor is reproduced by the runtime')
    if preprocessor.get('test_cfg'):
        raise ExportRefused(f'data_preprocessor.test_cfg={dict(preprocessor.test_cfg)} (test-time padding) is not '
                            'reproduced by the ONNX runtime; remove it for export')
    mean, std = preprocessor.get('mean'), preprocessor.get('std')
    if mean is None:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # normalisation disabled: (x - 0) / 1 is exact
    return dict(mean=[float(m) for m in mean], std=[float(s) for s in std],
                bgr_to_rgb=bool(preprocessor.get('bgr_to_rgb') or preprocessor.get('rgb_to_bgr')))


def describe_inference(model: nn.Module) -> Dict[str, object]:
    """``mode``, ``crop_size``, ``stride`` and ``align_corners`` of ``EncoderDecoder.inference``."""
    if type(model).__name__ != 'EncoderDecoder':
        raise ExportRefused(f'segmentor type {type(model).__name__}: only EncoderDecoder is exported')
    if model.decode_head.out_channels == 1:
        raise ExportRefused('a decode head with one output channel (sigmoid threshold) is not exported; the '
                            'runtime takes the arg-max over classes')
    test_cfg = model.test_cfg or {}
    mode = test_cfg.get('mode', 'whole')
    if mode not in ('whole', 'slide'):
        raise ExportRefused(f"test_cfg.mode={mode!r}: only 'whole' and 'slide' inference are reproduced")
    slide = mode == 'slide'
    return dict(mode=mode, crop_size=list(test_cfg['crop_size']) if slide else None,
                stride=list(test_cfg['stride']) if slide else None,
                align_corners=bool(model.decode_head.align_corners))


def describe_classes(model: nn.Module) -> Dict[str, List]:
    """Class names and RGB palette from the checkpoint's ``dataset_meta`` (what tools/infer.py draws with)."""
    meta = getattr(model, 'dataset_meta', None) or {}
    classes, palette = list(meta.get('classes', [])), [list(map(int, c)) for c in meta.get('palette', [])]
    num_classes = model.decode_head.out_channels
    if len(palette) < num_classes:
        raise ExportRefused(f'the model predicts {num_classes} classes but its dataset_meta has {len(palette)} '
                            'palette colours; save the checkpoint with its dataset metainfo (tools/train.py does)')
    return dict(classes=[str(c) for c in classes], palette=palette)


def largest_input(resize: Optional[ResizeSpec], inference: Dict[str, object]) -> Optional[Tuple[int, int]]:
    """Bound on the ``(h, w)`` extent of any model input at run time, or None if the images decide it."""
    if inference['mode'] == 'slide':
        return tuple(inference['crop_size'])
    if resize is None or resize.scale is None:
        return None
    long_side, short_side = max(resize.scale), min(resize.scale)
    return (long_side, short_side) if resize.keep_ratio else (resize.scale[1], resize.scale[0])


def patch_grid(size: Tuple[int, int], patch_size: int) -> int:
    """Number of ``patch_size`` patches covering an image of ``size``."""
    return math.ceil(size[0] / patch_size) * math.ceil(size[1] / patch_size)
