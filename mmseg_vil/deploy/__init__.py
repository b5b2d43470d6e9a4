"""Export segmentors to ONNX (``tools/deploy/export_onnx.py``); run them with :mod:`mmseg_vil_runtime`."""
from .errors import ExportMismatch, ExportRefused
from .export import DEFAULT_TOLERANCE, ExportReport, export_segmentor, trace_segmentor
from .graph import (SegmentorGraph, ShapeGenericAdaptiveAvgPool2d, choose_mlstm_backend, make_pooling_shape_generic,
                    set_mlstm_backend)

__all__ = [
    'DEFAULT_TOLERANCE', 'ExportMismatch', 'ExportRefused', 'ExportReport', 'SegmentorGraph', 'choose_mlstm_backend',
    'ShapeGenericAdaptiveAvgPool2d', 'export_segmentor', 'make_pooling_shape_generic', 'set_mlstm_backend',
    'trace_segmentor'
]
