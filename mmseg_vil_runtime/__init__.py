"""Run segmentors exported by ``tools/deploy/export_onnx.py`` with ONNX Runtime, without PyTorch.

A package of its own because importing ``mmseg_vil`` imports PyTorch and MMSegmentation (it registers the models);
this one needs only NumPy, OpenCV and ONNX Runtime, so a deployment machine can run exported models with nothing
else installed. Everything the pre- and post-processing needs travels in the ONNX file's metadata
(:mod:`.metadata`), written at export time from the model's config and checkpoint.
"""
from .files import IMAGE_EXTENSIONS, InferenceSummary, collect_images, overlay
from .metadata import SegmentorMetadata
from .predictor import OnnxSegmentor, segment_files

__all__ = [
    'IMAGE_EXTENSIONS', 'InferenceSummary', 'OnnxSegmentor', 'SegmentorMetadata', 'collect_images', 'overlay',
    'segment_files'
]
