"""The ONNX metadata of an exported segmentor: all that inference needs besides the graph.

Stored as the model's ``metadata_props`` (string key-value pairs; values are JSON), so viewers such as Netron show
them and :class:`~.predictor.OnnxSegmentor` needs neither the config nor PyTorch. ``format`` identifies our files
and the version of this layout.
"""
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Mapping, Optional

FORMAT = 'mmseg-vil-segmentor/1'


@dataclass
class ResizeSpec:
    """The test pipeline's ``Resize`` transform (MMCV's rule), applied to every image before the model.

    ``scale`` is MMCV's ``(w, h)``; with ``keep_ratio`` it bounds the long and the short side instead. Without a
    ``scale``, ``scale_factor`` ``(fw, fh)`` multiplies the image size.
    """

    scale: Optional[List[int]]
    scale_factor: Optional[List[float]]
    keep_ratio: bool
    interpolation: str


@dataclass
class SegmentorMetadata:
    """What :func:`mmseg_vil.deploy.export_segmentor` records; see the README's "Deploy" section."""

    config: str  # config file the model was built from
    checkpoint: str  # checkpoint file name
    classes: List[str]
    palette: List[List[int]]  # RGB colour of each class
    mean: List[float]  # SegDataPreProcessor: (image - mean) / std per channel, after the optional BGR -> RGB
    std: List[float]
    bgr_to_rgb: bool
    resize: Optional[ResizeSpec]  # None: images enter at their own size
    mode: str  # 'whole' or 'slide' (MMSegmentation's test_cfg.mode)
    crop_size: Optional[List[int]]  # slide windows (h, w)
    stride: Optional[List[int]]
    align_corners: bool  # of the final resize of the logits to the image size
    input_size: Optional[List[int]]  # (h, w) of a fixed-size graph; None when height and width are dynamic
    min_input_size: int  # smallest height and width a dynamic graph was verified for
    opset: int
    versions: Dict[str, str]  # packages that exported the graph
    backbone: str  # backbone type and the backend its graph was traced with
    export_check: Dict[str, object] = field(default_factory=dict)  # sizes, max abs difference, tolerance

    def to_properties(self) -> Dict[str, str]:
        """``metadata_props`` entries: ``format`` and one JSON value per field."""
        values = asdict(self)
        return {'format': FORMAT, **{key: json.dumps(value) for key, value in values.items()}}

    @classmethod
    def from_properties(cls, properties: Mapping[str, str], source: str) -> 'SegmentorMetadata':
        """Parse ``metadata_props`` of ``source`` (named in errors); refuse files that are not ours."""
        if properties.get('format') != FORMAT:
            found = properties.get('format')
            raise ValueError(f'{source} is not a segmentor exported by tools/deploy/export_onnx.py (metadata '
                             f'"format" is {found!r}, expected {FORMAT!r}); export it with that tool')
        missing = [f.name for f in fields(cls) if f.name not in properties]
        if missing:
            raise ValueError(f'{source}: metadata lacks {missing}; export it again with tools/deploy/export_onnx.py')
        values = {f.name: json.loads(properties[f.name]) for f in fields(cls)}
        if values['resize'] is not None:
            values['resize'] = ResizeSpec(**values['resize'])
        return cls(**values)
