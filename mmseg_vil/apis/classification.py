# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Top-k classification with a ViL classifier through MMPretrain's ``ImageClassificationInferencer``.

The checkpoint (released ``.th``, VisionLSTM2 state dict or MMPretrain checkpoint) is loaded under the package's
checkpoint policy, with the position embedding resampled to the config's resolution; MMPretrain's own loading
would not be strict. Images are read here, one by one, so that an unreadable file is reported and skipped instead
of ending the batch.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmpretrain import ImageClassificationInferencer

from ..models.classifier_checkpoint import load_vil_classifier_checkpoint
from ..utils.checkpoint import read_checkpoint
from ..utils.config import read_model_config
from .batch_inputs import read_image, resolve_device


@dataclass
class ClassificationSummary:
    """Per image: the top-k predictions, or the reason it was skipped."""

    predictions: Dict[str, List[Dict]] = field(default_factory=dict)  # image -> [{'label', 'class', 'score'}]
    failures: Dict[str, str] = field(default_factory=dict)  # image -> reason


def checkpoint_classes(path: str) -> Optional[Sequence[str]]:
    """Class names a training-run checkpoint records; ``None`` for files without them (official, converted)."""
    _, meta = read_checkpoint(path)
    return meta.get('dataset_meta', {}).get('classes')


def build_inferencer(config: str,
                     checkpoint: str,
                     device: Optional[str] = None,
                     allow_partial: bool = False) -> ImageClassificationInferencer:
    """An inferencer whose model holds ``checkpoint`` (on CUDA when available, unless ``device`` says otherwise)."""
    read_model_config(config, 'classification')  # MMPretrain would answer a wrong config with a registry traceback
    inferencer = ImageClassificationInferencer(config, pretrained=False, device=resolve_device(device),
                                               classes=checkpoint_classes(checkpoint))
    load_vil_classifier_checkpoint(inferencer.model, checkpoint, allow_partial=allow_partial)
    return inferencer


def top_k(inferencer: ImageClassificationInferencer, images: Sequence[np.ndarray], k: int = 5) -> List[List[Dict]]:
    """Per image (BGR array), the ``k`` most probable classes as ``{'label', 'class', 'score'}``, best first."""
    results = []
    for sample in inferencer(list(images), return_datasamples=True):
        scores, labels = sample.pred_score.topk(min(k, sample.pred_score.numel()))
        results.append([{'label': label, 'class': inferencer.classes[label] if inferencer.classes else None,
                         'score': score} for score, label in zip(scores.tolist(), labels.tolist())])
    return results


def classify_files(inferencer: ImageClassificationInferencer,
                   paths: Sequence[str],
                   k: int = 5) -> ClassificationSummary:
    """Top-k classes of every readable image file; the others are recorded with the reason."""
    summary = ClassificationSummary()
    readable = {}
    for path in paths:
        image, reason = read_image(path)
        if image is None:
            summary.failures[path] = reason
        else:
            readable[path] = image
    if readable:
        summary.predictions = dict(zip(readable, top_k(inferencer, list(readable.values()), k)))
    return summary
