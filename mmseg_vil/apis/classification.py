# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Top-k classification with a ViL classifier through MMPretrain's ``ImageClassificationInferencer``.

The checkpoint (released ``.th``, VisionLSTM2 state dict or MMPretrain checkpoint) is loaded strictly with the
position embedding resampled to the config's resolution; MMPretrain's own loading would not be strict.
"""
from typing import Dict, List, Optional, Sequence

import torch
from mmpretrain import ImageClassificationInferencer

from ..models.classifier_checkpoint import load_vil_classifier_checkpoint


def checkpoint_classes(path: str) -> Optional[Sequence[str]]:
    """Class names a training-run checkpoint records; ``None`` for files without them (official, converted)."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    meta = checkpoint.get('meta') or {}
    return meta.get('dataset_meta', {}).get('classes')


def build_inferencer(config: str, checkpoint: str, device: str = 'cpu') -> ImageClassificationInferencer:
    """An inferencer whose model holds ``checkpoint``, loaded strictly (MMPretrain's own loading is not)."""
    inferencer = ImageClassificationInferencer(config, pretrained=False, device=device,
                                               classes=checkpoint_classes(checkpoint))
    load_vil_classifier_checkpoint(inferencer.model, checkpoint)
    return inferencer


def top_k(inferencer: ImageClassificationInferencer, images: Sequence[str], k: int = 5) -> List[List[Dict]]:
    """Per image, the ``k`` most probable classes as ``{'label', 'class', 'score'}``, most probable first."""
    results = []
    for sample in inferencer(list(images), return_datasamples=True):
        scores, labels = sample.pred_score.topk(min(k, sample.pred_score.numel()))
        results.append([{'label': label, 'class': inferencer.classes[label] if inferencer.classes else None,
                         'score': score} for score, label in zip(scores.tolist(), labels.tolist())])
    return results
