"""The module that is traced into ONNX, and the export-time substitutions that keep its graph valid for every size.

``torch.onnx.export`` traces Python once; whatever the code decides from a tensor's size at that moment is frozen
into the graph. Two things in the segmentors decide so and are replaced here by modules that compute the same
function from symbolic sizes:

* the mLSTM backend of every ViL mixer (:func:`set_mlstm_backend`): the fused Triton kernels cannot be traced, the
  two pure-PyTorch forms can;
* ``nn.AdaptiveAvgPool2d`` with an output larger than one (UperNet's pyramid pooling): PyTorch decomposes it with
  a window length computed from the traced size, so a graph exported at one size averages wrong windows at
  another. :class:`ShapeGenericAdaptiveAvgPool2d` builds the averaging matrices from the input size instead.

Everything else that branches on sizes (padding to whole patches, resampling the position embedding) takes its
general branch when traced at a size that is not a multiple of the patch size and differs from the build size;
:func:`mmseg_vil.deploy.export_segmentor` traces at such a size and verifies other sizes numerically.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.layers.mlstm import MLSTM_BACKENDS, PARALLEL_MAX_LEN
from ..models.layers.vil_block import MLSTMMixer
from .errors import ExportRefused

# Pure-PyTorch mLSTM forms that trace into ONNX (both compute the official function; see models/layers/mlstm).
EXPORTABLE_MLSTM_BACKENDS = ('parallel', 'chunkwise')


class SegmentorGraph(nn.Module):
    """Normalised images ``(N, 3, H, W)`` -> logits ``(N, C, H, W)``: ``EncoderDecoder.encode_decode`` as a graph.

    Backbone, neck and decode head, then the bilinear resize to the input size that MMSegmentation's
    ``predict_by_feat`` applies; the image metadata it reads that size from is replaced by the input's shape.
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, inputs: Tensor) -> Tensor:
        head = self.segmentor.decode_head
        logits = head(self.segmentor.extract_feat(inputs))
        return F.interpolate(logits, size=inputs.shape[2:], mode='bilinear', align_corners=head.align_corners)


def _bin_weights(size: Union[int, torch.SymInt], bins: int, like: Tensor) -> Tensor:
    """``(bins, size)`` matrix whose row ``i`` averages ``[floor(i size / bins), ceil((i + 1) size / bins))``."""
    index = torch.arange(bins, device=like.device)
    start = (index * size) // bins
    end = ((index + 1) * size + bins - 1) // bins
    position = torch.arange(size, device=like.device)
    inside = (position >= start[:, None]) & (position < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class ShapeGenericAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two matrix products whose matrices follow the input size in a traced graph."""

    def __init__(self, output_size: Tuple[int, int]) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        rows = _bin_weights(x.shape[-2], self.output_size[0], x)
        cols = _bin_weights(x.shape[-1], self.output_size[1], x)
        return rows @ x @ cols.transpose(0, 1)


def make_pooling_shape_generic(model: nn.Module) -> int:
    """Replace every ``nn.AdaptiveAvgPool2d`` of ``model`` in place; return how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                size = (size, size) if isinstance(size, int) else tuple(size)
                if None in size:
                    raise ExportRefused(f'{name}: AdaptiveAvgPool2d with output size {size} (None keeps the input '
                                        'size) is not supported by the dynamic-size export; use a fixed --shape')
                setattr(parent, name, ShapeGenericAdaptiveAvgPool2d(size))
                replaced += 1
    return replaced


def choose_mlstm_backend(requested: str, max_tokens: Optional[int]) -> str:
    """The mLSTM form to trace: ``requested``, or for ``'auto'`` the form ``'auto'`` would run on the CPU.

    ``max_tokens`` bounds the patches of any input the graph will get (None: unbounded). Up to
    ``PARALLEL_MAX_LEN`` tokens the quadratic form is the faster one (and exports fastest); beyond, the chunkwise
    form, whose memory is linear in the tokens.
    """
    if requested == 'auto':
        return 'parallel' if max_tokens is not None and max_tokens <= PARALLEL_MAX_LEN else 'chunkwise'
    if requested not in EXPORTABLE_MLSTM_BACKENDS:
        reason = ('its Triton kernels cannot be expressed in ONNX' if requested.startswith('fused') else
                  'there is no such backend' if requested not in MLSTM_BACKENDS else 'it is not a PyTorch form')
        raise ExportRefused(f'mlstm_backend={requested!r} cannot be exported: {reason}. Use auto or one of '
                            f'{EXPORTABLE_MLSTM_BACKENDS}; every backend computes the same function')
    return requested


def set_mlstm_backend(model: nn.Module, backend: str) -> int:
    """Set ``mlstm_backend`` of every ViL mixer of ``model``; return how many mixers there are."""
    mixers = [module for module in model.modules() if isinstance(module, MLSTMMixer)]
    for mixer in mixers:
        mixer.mlstm_backend = backend
    return len(mixers)
