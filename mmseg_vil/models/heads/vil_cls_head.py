"""Classifier head of the official Vision-LSTM models: ``[LayerNorm ->] Linear`` on the pooled tokens.

The backbone (``out_type='pooled'`` or ``'avg_pooled'``, ``final_norm=True``) supplies the pooled first and last
token; the released checkpoints' ``head.0`` / ``head.1`` become ``head.norm`` / ``head.fc`` here.
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
    """Linear classifier with the official models' pre-logits LayerNorm.

    Args:
        num_classes: number of classes.
        in_channels: width of the pooled feature (``2 * embed_dims`` for first+last-token concatenation,
            ``embed_dims`` for their mean).
        with_norm: the LayerNorm before the classifier: VisionLSTM2's ``legacy_norm`` (True in every released
            model, False is VisionLSTM2's own default) and v1's ``norm`` (always present).
        norm_eps: its epsilon: 1e-5 in VisionLSTM2, 1e-6 in v1.
        init_cfg: defaults to the official head init, truncated normal with std 2e-5 and zero bias.
        **kwargs: passed to :class:`mmpretrain.models.heads.ClsHead` (``loss``, ``topk``, ``cal_acc``).
    """

    def __init__(self, num_classes: int, in_channels: int, with_norm: bool = True, norm_eps: float = 1e-5,
                 init_cfg: Optional[dict] = dict(type='TruncNormal', layer='Linear', std=2e-5, bias=0.0),
                 **kwargs) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, init_cfg=init_cfg, **kwargs)
        self.norm = nn.LayerNorm(in_channels, eps=norm_eps) if with_norm else nn.Identity()

    def pre_logits(self, feats: Tuple[Tensor, ...]) -> Tensor:
        return self.norm(feats[-1])
