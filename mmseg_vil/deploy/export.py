"""Export a trained MMSegmentation ``EncoderDecoder`` (ViL, DeiT, Vim, ...) to ONNX and verify it against PyTorch.

The graph maps normalised images to logits at the input size (:class:`~.graph.SegmentorGraph`); everything around
it (resize, normalisation, sliding windows, classes, palette) is written into the file's metadata for
:mod:`mmseg_vil_runtime`. The file is written only after ONNX Runtime reproduced PyTorch's logits within the
tolerance on every verification input; the differences are printed and recorded in the metadata.
"""
import copy
import os
import os.path as osp
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mmengine
import mmseg
import numpy as np
import onnx
import onnx_ir.passes.common as ir_passes
import onnxruntime as ort
import onnxscript
import torch
from mmengine.config import Config
from mmengine.utils import to_2tuple
from torch import nn

from mmseg_vil_runtime.metadata import SegmentorMetadata

from ..apis.inference import init_segmentor
from ..models.layers.vil_block import MLSTMMixer
from ..utils.config import read_model_config
from ..version import __version__
from .describe import (describe_classes, describe_inference, describe_preprocessor, describe_test_pipeline,
                       largest_input, patch_grid)
from .errors import ExportMismatch, ExportRefused
from .graph import SegmentorGraph, choose_mlstm_backend, make_pooling_shape_generic, set_mlstm_backend

DEFAULT_TOLERANCE = 1e-3  # max |ONNX Runtime - PyTorch| of float32 logits on the verification inputs
# Backbones whose graph holds only for the traced size: Vim's selective scan unrolls an odd-even reduction whose
# steps depend on the token count.
FIXED_SIZE_BACKBONES = {'Vim': 'its selective scan unrolls an odd-even reduction shaped by the token count'}


@dataclass
class ExportReport:
    """The written file, its metadata and the verified differences (``'HxW'`` -> max abs difference)."""

    path: str
    metadata: SegmentorMetadata
    differences: Dict[str, float]
    seconds: float


def package_versions() -> Dict[str, str]:
    return {'mmseg_vil': __version__, 'torch': torch.__version__, 'onnx': onnx.__version__,
            'onnxscript': onnxscript.__version__, 'onnxruntime': ort.__version__, 'mmsegmentation': mmseg.__version__,
            'mmengine': mmengine.__version__}


def default_input_size(cfg: Config, inference: dict) -> Tuple[int, int]:
    """Slide windows, else the training crop of the data preprocessor, else 512x512."""
    if inference['mode'] == 'slide':
        return tuple(inference['crop_size'])
    size = (cfg.model.get('data_preprocessor') or {}).get('size')
    return tuple(size) if size else (512, 512)


def generic_trace_size(sizes: Sequence[Tuple[int, int]], patch_size: int) -> Tuple[int, int]:
    """A size to trace a dynamic graph at whose size-dependent branches are the general ones.

    Neither side a multiple of the patch size (padding happens), grids larger than those of ``sizes`` (the export
    size and the backbone's build size: the position embedding is resampled) and different from each other.
    """
    grid = max(-(-side // patch_size) for size in sizes for side in size)
    return (grid + 2) * patch_size + 7, (grid + 3) * patch_size + 9


def verification_sizes(size: Tuple[int, int], trace_size: Tuple[int, int], min_size: Optional[int],
                       patch_size: int) -> List[Tuple[int, int]]:
    """The export size; for a dynamic graph also the traced size and the smallest size, with an odd other side."""
    if min_size is None:
        return [size]
    small = (min_size, min_size + patch_size + 3)
    return list(dict.fromkeys([size, trace_size, small]))


def _simplify(model) -> None:
    """Fold constants, drop dead and repeated nodes and initialisers (in place).

    The part of onnxscript's optimiser that shrinks the graph; its pattern rewriter is skipped because it takes
    minutes on Vim's unrolled scan, and ONNX Runtime applies its own fusions when it loads the model.
    """
    onnxscript.optimizer.fold_constants(model)
    for simplify in (ir_passes.RemoveUnusedNodesPass(), ir_passes.CommonSubexpressionEliminationPass(),
                     ir_passes.DeduplicateInitializersPass(), ir_passes.RemoveUnusedOpsetsPass()):
        simplify(model)


def _root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost cause: the op or guard that failed, not the exporter's wrapper."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def trace_segmentor(model: nn.Module, trace_size: Tuple[int, int], min_size: Optional[int] = None,
                    opset: Optional[int] = None):
    """``torch.onnx.ONNXProgram`` of ``model``'s :class:`~.graph.SegmentorGraph` traced at ``trace_size``.

    ``min_size`` makes height and width dynamic (from ``min_size`` up): the model is copied and its adaptive
    pooling made shape-generic; trace at :func:`generic_trace_size`. ViL mixers keep the backend they have. The
    graph is captured here rather than by ``torch.onnx.export``, whose capture answers a shape constraint it
    cannot prove by fixing the size. Size conditions PyTorch cannot prove become run-time assertions (which ONNX
    drops); the numerical verification at several sizes is what shows the graph general.
    """
    backbone = type(model.backbone).__name__
    graph_model = copy.deepcopy(model)
    dynamic_shapes = None
    if min_size is not None:
        make_pooling_shape_generic(graph_model)
        dynamic_shapes = ({2: torch.export.Dim.DYNAMIC(min=min_size), 3: torch.export.Dim.DYNAMIC(min=min_size)},)
    example = torch.zeros(1, 3, *trace_size)
    try:
        with torch.no_grad():
            exported = torch.export.export(SegmentorGraph(graph_model).eval(), (example,), strict=False,
                                           dynamic_shapes=dynamic_shapes,
                                           prefer_deferred_runtime_asserts_over_guards=True)
            program = torch.onnx.export(exported, (example,), dynamo=True, input_names=['inputs'],
                                        output_names=['logits'], opset_version=opset, optimize=False, verbose=False)
    except Exception as error:
        raise ExportRefused(f'the {backbone} segmentor could not be exported: {_root_cause(error)}') from error
    input_shape = program.model.graph.inputs[0].shape
    if min_size is not None and any(isinstance(input_shape[axis], int) for axis in (2, 3)):
        raise ExportRefused(f'the {backbone} graph fixed its input size to {input_shape} while traced; export it '
                            'with a fixed --shape')
    _simplify(program.model)
    return program


def _max_differences(model_bytes: bytes, reference: nn.Module, sizes: Sequence[Tuple[int, int]]) -> Dict[str, float]:
    """Max |ONNX Runtime - PyTorch| of the logits of a random normalised image of each size (inf for NaN)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(0)
    differences = {}
    for height, width in sizes:
        inputs = torch.randn(1, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = reference.encode_decode(inputs, [dict(img_shape=inputs.shape[2:])]).numpy()
        try:
            actual = session.run(None, {'inputs': inputs.numpy()})[0]
        except Exception as error:  # noqa: BLE001  (ONNX Runtime raises its own types)
            raise ExportMismatch(f'ONNX Runtime could not run the graph at {height}x{width}: {error}') from error
        if actual.shape != expected.shape:
            raise ExportMismatch(f'at {height}x{width} the graph returned logits of shape {actual.shape}, PyTorch '
                                 f'{expected.shape}')
        difference = float(np.abs(actual - expected).max())
        differences[f'{height}x{width}'] = difference if np.isfinite(difference) else float('inf')
    return differences


def check_output_path(out: str) -> None:
    """Refuse, before the minutes of tracing, an ``out`` that is no ``.onnx`` file name: a folder, or the config or
    checkpoint named by mistake, which the export would replace."""
    if osp.isdir(out) or not out.lower().endswith('.onnx'):
        raise ExportRefused(f'{out} is not an .onnx file name: the arguments are CONFIG CHECKPOINT OUT.onnx')


def export_segmentor(config: str,
                     checkpoint: str,
                     out: str,
                     size: Optional[Tuple[int, int]] = None,
                     dynamic: bool = False,
                     mlstm_backend: str = 'auto',
                     opset: Optional[int] = None,
                     tolerance: float = DEFAULT_TOLERANCE,
                     cfg_options: Optional[dict] = None,
                     log: Callable[[str], None] = print) -> ExportReport:
    """Export the segmentor of ``config`` with ``checkpoint`` to ``out``; refuse (nothing written) if it cannot.

    Args:
        size: ``(h, w)`` of the graph's input (fixed size) or of the representative input a dynamic graph is
            verified at; default: the slide window, else the training crop.
        dynamic: height and width are graph inputs (any size of at least ``min_input_size``); refused for
            backbones whose graph holds for one size only (Vim).
        mlstm_backend: mLSTM form traced for ViL: ``'auto'``, ``'parallel'`` or ``'chunkwise'``.
        tolerance: the largest max |ONNX Runtime - PyTorch| of the logits accepted on a verification input.
    """
    started = time.perf_counter()
    check_output_path(out)
    cfg = read_model_config(config, 'segmentation')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    resize = describe_test_pipeline(cfg)
    preprocess = describe_preprocessor(cfg)
    model = init_segmentor(cfg, checkpoint, device='cpu').eval()
    inference = describe_inference(model)
    classes = describe_classes(model)

    backbone = type(model.backbone).__name__
    if dynamic and backbone in FIXED_SIZE_BACKBONES:
        raise ExportRefused(f'{backbone} cannot be exported with dynamic height and width: '
                            f'{FIXED_SIZE_BACKBONES[backbone]}; export it with a fixed --shape (one file per size)')
    patch_size = getattr(model.backbone, 'patch_size', 16)
    patch_size = patch_size if isinstance(patch_size, int) else max(patch_size)
    size = tuple(size) if size else default_input_size(cfg, inference)
    smallest = patch_size + 1  # a grid of 2x2 patches: the neck's 1/32 max-pool needs two cells per side
    if min(size) < smallest:
        raise ExportRefused(f'--shape {size[0]} {size[1]}: the segmentor needs at least {smallest} pixels per side')
    min_size = smallest if dynamic else None
    description = backbone
    if any(isinstance(module, MLSTMMixer) for module in model.modules()):
        largest = size if not dynamic else largest_input(resize, inference)
        chosen = choose_mlstm_backend(mlstm_backend, largest and patch_grid(largest, patch_size))
        set_mlstm_backend(model, chosen)
        description = f'{backbone} (mLSTM {chosen})'
    elif mlstm_backend != 'auto':
        raise ExportRefused(f'--mlstm-backend {mlstm_backend} applies to ViL only; the {backbone} segmentor has no '
                            'mLSTM mixer')

    build_size = cfg.model.backbone.get('img_size')
    known_sizes = [size] + ([to_2tuple(build_size)] if build_size else [])
    trace_size = generic_trace_size(known_sizes, patch_size) if dynamic else size
    log(f'tracing {description} at {trace_size[0]}x{trace_size[1]} ({"dynamic" if dynamic else "fixed"} size)')
    program = trace_segmentor(model, trace_size, min_size, opset)

    sizes = verification_sizes(size, trace_size, min_size, patch_size)
    differences = _max_differences(program.model_proto.SerializeToString(), model, sizes)
    for name, difference in differences.items():
        log(f'verify {name}: max |ONNX Runtime - PyTorch| = {difference:.3g} (tolerance {tolerance:g})')
    worst = max(differences, key=differences.get)
    if differences[worst] > tolerance:
        hint = '; a fixed-size export (--shape without --dynamic) may still hold' if dynamic else ''
        raise ExportMismatch(f'the exported logits differ from PyTorch by {differences[worst]:.3g} at {worst}, above '
                             f'the tolerance {tolerance:g}; nothing was written to {out}{hint}')

    metadata = SegmentorMetadata(
        config=config, checkpoint=osp.basename(checkpoint), **classes, **preprocess, resize=resize, **inference,
        input_size=None if dynamic else list(size), min_input_size=min_size or min(size),
        opset=int(program.model.opset_imports['']), versions=package_versions(), backbone=description,
        export_check=dict(max_abs_diff=differences, tolerance=tolerance))
    program.model.metadata_props.update(metadata.to_properties())
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    partial = out + '.partial'  # a reader never sees half a file
    program.save(partial, external_data=False)
    os.replace(partial, out)
    return ExportReport(out, metadata, differences, time.perf_counter() - started)
