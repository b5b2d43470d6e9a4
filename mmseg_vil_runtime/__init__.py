"""Run segmentors exported by ``tools/deploy/export_onnx.py`` with ONNX Runtime, without PyTorch.

A package of its own because importing ``mmseg_vil`` imports PyTorch and MMSegmentation (it registers the models);
this one needs only NumPy and OpenCV, and ONNX Runtime for :mod:`.predictor`, so a deployment machine runs exported
models with nothing else installed. Everything the pre- and post-processing needs travels in the ONNX file's metadata
(:mod:`.metadata`), written at export time from the model's config and checkpoint. The package itself imports no
ONNX Runtime, so its file handling (:mod:`.files`) can serve PyTorch inference as well.
"""
from .files import IMAGE_EXTENSIONS, InferenceSummary, check_inputs_outside_results, collect_images, overlay
from .metadata import ResizeSpec, SegmentorMetadata

__all__ = [
    'IMAGE_EXTENSIONS', 'InferenceSummary', 'ResizeSpec', 'SegmentorMetadata', 'check_inputs_outside_results',
    'collect_images', 'overlay'
]
