"""User-facing workflows on top of ``mmseg.apis``: batch inference to files and model comparison."""
from .batch_inputs import collect_images, read_image, resolve_device
from .compare import ComparisonRow, ModelSpec, compare, plot_comparison, render_markdown, write_json
from .complexity import build_inference_model, count_flops, count_parameters
from .inference import InferenceSummary, SegmentationWriter, init_segmentor, segment_images

__all__ = [
    'ComparisonRow', 'InferenceSummary', 'ModelSpec', 'SegmentationWriter', 'build_inference_model', 'collect_images',
    'compare', 'count_flops', 'count_parameters', 'init_segmentor', 'plot_comparison', 'read_image',
    'render_markdown', 'resolve_device', 'segment_images', 'write_json'
]
