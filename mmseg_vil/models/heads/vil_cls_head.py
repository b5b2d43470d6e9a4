"""Classifier head of the released Vision-LSTM models: ``LayerNorm(2D) -> Linear`` on the pooled tokens.

The backbone (``out_type='pooled'``, ``final_norm=True``) supplies ``concat(first token, last token)``; the released
checkpoints' ``head.0`` / ``head.1`` become ``head.norm`` / ``head.fc`` here.
"""
from typing import Optional, Tuple

from torch import Tensor, nn

try:
    from mmpretrain.models.heads import LinearClsHead
except ImportError as err:  # pragma: no cover - mmpretrain is the optional "cls" extra
    raise ImportError('ViLClsHead needs mmpretrain (pip install mmseg-vil[cls])') from err

from ...registry import register_model


@register_model
class ViLClsHead(LinearClsHead):
    """Linear classifier with the released models' pre-logits LayerNorm.

    Args:
        num_classes: number of classes.
        in_channels: width of the pooled feature (``2 * embed_dims`` for first+last-token pooling).
        init_cfg: defaults to the official head init, truncated normal with std 2e-5 and zero bias.
        **kwargs: passed to :class:`mmpretrain.models.heads.ClsHead` (``loss``, ``topk``, ``cal_acc``).
    """

    def __init__(self, num_classes: int, in_channels: int,
                 init_cfg: Optional[dict] = dict(type='TruncNormal', layer='Linear', std=2e-5, bias=0.0),
                 **kwargs) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, init_cfg=init_cfg, **kwargs)
        self.norm = nn.LayerNorm(in_channels)

    def pre_logits(self, feats: Tuple[Tensor, ...]) -> Tensor:
        return self.norm(feats[-1])
