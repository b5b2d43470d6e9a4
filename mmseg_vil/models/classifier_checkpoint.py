# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Vision-LSTM classifier checkpoints as MMPretrain ``ImageClassifier`` weights (``backbone.*``, ``head.*``).

Every layout :func:`~mmseg_vil.models.backbones.vil_checkpoint.convert_vil_state_dict` recognises (released
``vil2_*.th``, ``VisionLSTM2`` state dicts, this package's own) is accepted. MMEngine's loaders (``load_from``,
``init_cfg=dict(type='Pretrained')`` on the classifier, the inferencers) load with ``strict=False`` and only log
mismatches, so :func:`load_vil_classifier_checkpoint` is the strict way in, and
``tools/model_converters/vil2mmpretrain.py`` writes files those loaders then read without any key surgery.
"""
import os
from collections import OrderedDict
from typing import Mapping, Union

from torch import Tensor, nn

from ..utils.checkpoint import CheckpointMismatchError, StateDict, load_state_dict_strictly, read_state_dict
from .backbones.vil_checkpoint import convert_vil_state_dict, split_backbone_and_head


def vil_classifier_state_dict(state_dict: Mapping[str, Tensor], source: str = 'checkpoint') -> StateDict:
    """Convert a Vision-LSTM classifier checkpoint to MMPretrain ``ImageClassifier`` key names.

    Raises :class:`CheckpointMismatchError` for a backbone-only checkpoint (no classifier to convert) or one of
    another architecture.
    """
    try:
        converted = convert_vil_state_dict(state_dict, source)
    except ValueError as error:
        raise CheckpointMismatchError(f'{error}; a ViL classifier config needs a ViL checkpoint') from error
    backbone, head = split_backbone_and_head(converted)
    if 'fc.weight' not in head:
        raise CheckpointMismatchError(f'{source} has no classifier (head.1 / head / head.fc weights); it holds '
                                      'a backbone only: load it with the backbone\'s init_cfg instead')
    return OrderedDict([*((f'backbone.{k}', v) for k, v in backbone.items()),
                        *((f'head.{k}', v) for k, v in head.items())])


def load_vil_classifier_checkpoint(model: nn.Module,
                                   checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]],
                                   allow_partial: bool = False) -> None:
    """Load a Vision-LSTM classifier checkpoint (path or state dict) into an MMPretrain ``ImageClassifier``.

    The position embedding is resampled (bicubic, as the official loader) to the model's grid, e.g. a 192px
    pre-training checkpoint into a 224px model; any other missing, unexpected or mis-shaped key raises, unless
    ``allow_partial`` (see :func:`~mmseg_vil.utils.checkpoint.load_state_dict_strictly`).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = read_state_dict(source)
    else:
        source = 'state dict'
    load_state_dict_strictly(model, vil_classifier_state_dict(checkpoint, source), source=source,
                             allow_partial=allow_partial)
