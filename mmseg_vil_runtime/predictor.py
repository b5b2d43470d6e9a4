"""Segment images with an exported segmentor in ONNX Runtime: the counterpart of ``mmseg.apis.inference_model``."""
import os.path as osp
import sys
from typing import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from .files import InferenceSummary, check_inputs_outside_results, output_paths, overlay, read_image, write_image
from .metadata import SegmentorMetadata
from .transforms import normalise, resize_image, resize_logits, slide_windows


class OnnxSegmentor:
    """An ONNX Runtime session of an exported segmentor and the processing its metadata describes.

    Args:
        model_path: ``.onnx`` file written by ``tools/deploy/export_onnx.py``.
        providers: ONNX Runtime execution providers, in order of preference.
        threads: intra-op threads (0: ONNX Runtime's default, one per core).
    """

    def __init__(self, model_path: str, providers: Sequence[str] = ('CPUExecutionProvider',), threads: int = 0) -> None:
        if not osp.isfile(model_path):
            raise FileNotFoundError(f'{model_path!r} is not a file; pass the .onnx file written by export_onnx.py')
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: the optimiser's notes about unfoldable nodes are noise here
        try:
            self.session = ort.InferenceSession(model_path, options, providers=list(providers))
        except Exception as error:  # noqa: BLE001  (ONNX Runtime raises its own types)
            raise ValueError(f'{model_path} cannot be loaded by ONNX Runtime ({error}); pass the .onnx file written '
                             'by export_onnx.py') from error
        self.meta = SegmentorMetadata.from_properties(self.session.get_modelmeta().custom_metadata_map, model_path)
        self.input_name = self.session.get_inputs()[0].name
        self.palette = np.asarray(self.meta.palette, np.uint8)
        self.mask_dtype = np.uint8 if len(self.palette) <= 256 else np.uint16

    def check_input_size(self, height: int, width: int) -> None:
        """Refuse a model input the graph was not built or verified for, naming the way out."""
        fixed, smallest = self.meta.input_size, self.meta.min_input_size
        if fixed is not None and [height, width] != fixed:
            raise ValueError(f'the model input is {height}x{width} but the graph was exported for {fixed[0]}x'
                             f'{fixed[1]} only; export with --dynamic (or --shape {height} {width})')
        if min(height, width) < smallest:
            raise ValueError(f'the model input is {height}x{width}, smaller than the {smallest} pixels the dynamic '
                             'graph was verified for')

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """``(1, C, h, w)`` logits of one normalised ``(1, 3, h, w)`` input, at the input's size."""
        self.check_input_size(*inputs.shape[2:])
        return self.session.run(None, {self.input_name: inputs})[0]

    def _slide_logits(self, inputs: np.ndarray) -> np.ndarray:
        """Average of the overlapping windows' logits (``EncoderDecoder.slide_inference``)."""
        height, width = inputs.shape[2:]
        total, count = None, np.zeros((height, width), np.float32)
        for y1, y2, x1, x2 in slide_windows(height, width, self.meta.crop_size, self.meta.stride):
            window = self.logits(np.ascontiguousarray(inputs[:, :, y1:y2, x1:x2]))
            if total is None:
                total = np.zeros((*window.shape[:2], height, width), np.float32)
            total[:, :, y1:y2, x1:x2] += window
            count[y1:y2, x1:x2] += 1
        return total / count

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Class index of every pixel of a BGR ``uint8`` image, at the image's size."""
        meta = self.meta
        inputs = normalise(resize_image(image, meta.resize), meta.mean, meta.std, meta.bgr_to_rgb)
        logits = self._slide_logits(inputs) if meta.mode == 'slide' else self.logits(inputs)
        return resize_logits(logits[0], image.shape[:2], meta.align_corners).argmax(0).astype(self.mask_dtype)


def _progress(items: Sequence[str], enabled: bool) -> Iterator[str]:
    """Iterate with tqdm's bar when it is installed, else with a counter on a terminal's stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if not enabled or (tqdm is None and not sys.stderr.isatty()):
        yield from items
    elif tqdm is not None:
        yield from tqdm(items, unit='img')
    else:
        for done, item in enumerate(items, 1):
            yield item
            print(f'\r{done}/{len(items)} images', end='\n' if done == len(items) else '', file=sys.stderr)


def segment_files(segment: Callable[[np.ndarray], np.ndarray], paths: Sequence[str], out_dir: str,
                  palette: np.ndarray, opacity: float = 0.5, progress: bool = True) -> InferenceSummary:
    """Write ``segment``'s mask and overlay of every image (layout of :mod:`.files`); record failures and go on."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f'opacity must be in [0, 1], got {opacity}')
    check_inputs_outside_results(paths, out_dir)
    summary = InferenceSummary()
    if not paths:
        return summary
    root = osp.commonpath([osp.dirname(osp.abspath(path)) for path in paths])
    for path in _progress(paths, progress):
        image, reason = read_image(path)
        if image is None:
            summary.failures[path] = reason
            continue
        try:
            mask = segment(image)
        except Exception as error:  # noqa: BLE001  (one bad image must not stop the others)
            summary.failures[path] = f'inference failed: {error!r}'
            continue
        mask_path, vis_path = output_paths(path, root, out_dir)
        write_image(mask_path, mask)
        write_image(vis_path, overlay(image, mask, palette, opacity))
        summary.outputs[path] = (mask_path, vis_path)
    return summary
