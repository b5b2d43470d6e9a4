# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""The package's configs by name, the OpenMMLab way: ``model-index.yml`` and the ``configs/*/metafile.y*ml`` it imports.

On ``import mmseg_vil`` (from a source checkout or an editable install, where ``configs/`` lies next to the package):

* the classification metafile is registered in MMPretrain's ``ModelHub``, so that ``mmpretrain.list_models('vil*')``
  and ``mmpretrain.get_model('vil-t16_192px-pre_8xb128-20e_in1k-224px')`` find the ViL classifiers;
* MMEngine's inferencers look a model name up in the metafiles of their own package only, so for scope ``'mmseg'``
  :func:`register_in_inferencers` lets them try this package's segmentation models first:
  ``MMSegInferencer('upernet_vil-t16_1xb16-160k_ade20k-512x512', weights=PATH)``.

The metafiles carry the paper's reported metrics; no weights are released for these configs, so loading by name
gives the architecture and ``weights``/``pretrained`` must name a checkpoint.
"""
import os.path as osp
from typing import Dict, List, Optional, Tuple

from mmengine.config import Config
from mmengine.fileio import load

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODEL_INDEX = osp.join(ROOT, 'model-index.yml')


def metafiles() -> List[str]:
    """Absolute paths of the metafiles ``model-index.yml`` imports; empty where the configs are not installed."""
    if not osp.isfile(MODEL_INDEX):
        return []
    return [osp.join(ROOT, path) for path in load(MODEL_INDEX)['Import']]


def _is_classifier(model: dict) -> bool:
    """Classification configs, including the pre-training stages, which have no result of their own."""
    return model['Config'].startswith('configs/classification/')


def metafile_entries() -> Dict[str, dict]:
    """Every metafile entry by lower-case name (``Config`` relative to the repository root, as in the files)."""
    return {model['Name'].lower(): model for path in metafiles() for model in load(path)['Models']}


def register_in_mmpretrain() -> None:
    """Add the classification metafiles to MMPretrain's ``ModelHub`` (once)."""
    from mmpretrain.apis.model import ModelHub

    for path in metafiles():
        entries = load(path)['Models']
        if all(map(_is_classifier, entries)) and not any(ModelHub.has(m['Name'].lower()) for m in entries):
            ModelHub.register_model_index(path, config_prefix=ROOT)


def find_segmentation_model(name: str) -> Optional[Tuple[Config, Optional[str]]]:
    """(config, weights or None) of this package's segmentation model ``name``; ``None`` if it is not one."""
    model = metafile_entries().get(name.lower())
    if model is None or _is_classifier(model):
        return None
    return Config.fromfile(osp.join(ROOT, model['Config'])), model.get('Weights')


def register_in_inferencers() -> None:
    """Let MMEngine inferencers of scope ``'mmseg'`` find this package's models by name (see the module doc)."""
    from mmengine.infer import BaseInferencer

    original = BaseInferencer._load_model_from_metafile
    if getattr(original, 'mmseg_vil_models', False):
        return

    def load_model_from_metafile(self, model: str):
        found = find_segmentation_model(model) if self.scope == 'mmseg' else None
        return found if found is not None else original(self, model)

    load_model_from_metafile.mmseg_vil_models = True
    BaseInferencer._load_model_from_metafile = load_model_from_metafile
