"""User-facing workflows on top of ``mmseg.apis``: batch inference to files and model comparison."""
from .inference import InferenceSummary, SegmentationWriter, collect_images, init_segmentor, segment_images

__all__ = ['InferenceSummary', 'SegmentationWriter', 'collect_images', 'init_segmentor', 'segment_images']
