"""Parameters and FLOPs of a segmentor, counted the same way for every backbone.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix products and convolutions that
actually run (``mm``, ``bmm``, ``addmm``, convolutions, attention kernels), one multiply-add as **2 FLOPs**. It needs
no tracing, so it sees Python control flow such as ViL's alternating traversal directions and Vim's chunked scan;
element-wise work (activations, norms, the gating and decay matrix of the mLSTM, the selective-scan recurrence) is
not counted, as in fvcore and MMEngine. Those tools report multiply-adds ("MACs") under the name FLOPs, as most papers
do: halve our numbers to compare with them.

The counted model is the inference graph: backbone, neck and decode head on one image, without the auxiliary head,
as MMSegmentation's ``get_flops.py`` does. ViL is counted with its quadratic ("parallel") mLSTM form, the form of
the paper's FLOPs; a chunkwise or fused kernel computes the same function with a different operation count. Its
q/k/v projections count the products of their 4x4 blocks (the CPU path multiplies zero-padded tiles, but not under a
FLOP counter).
"""
import copy
from typing import Tuple

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.backbones import ViL


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def build_inference_model(cfg: Config) -> nn.Module:
    """The segmentor of ``cfg`` as counted here: no auxiliary head, no pretrained weights, ViL in parallel form."""
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pop('auxiliary_head', None)
    model_cfg.pop('pretrained', None)
    model_cfg.backbone.pop('init_cfg', None)
    backbone_type = model_cfg.backbone.type
    backbone_cls = MODELS.get(backbone_type) if isinstance(backbone_type, str) else backbone_type
    if issubclass(backbone_cls, ViL):
        model_cfg.backbone.mlstm_backend = 'parallel'
    return MODELS.build(model_cfg).eval()


def count_flops(model: nn.Module, shape: Tuple[int, int] = (512, 512), device: str = 'cpu') -> int:
    """FLOPs (2 per multiply-add) of one forward pass of ``model`` in ``'tensor'`` mode on a ``(1, 3, H, W)`` input.

    The input skips the data preprocessor (normalisation and padding do no counted work).
    """
    model = model.to(device)
    inputs = torch.zeros(1, 3, *shape, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(inputs, mode='tensor')
    return counter.get_total_flops()
