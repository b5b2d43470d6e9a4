"""The configs by name, the OpenMMLab way (model-index.yml, configs/*/metafile.y*ml, mmseg_vil.model_zoo):
MMPretrain's list_models/get_model and MMSeg's inferencer find them, with the paper's metrics (vil_spec.md §8)."""
import os.path as osp
from types import SimpleNamespace

import mmpretrain
import pytest
from e2e_helpers import ROOT
from mmengine.infer import BaseInferencer
from mmpretrain.apis.model import ModelHub

from mmseg_vil import model_zoo

# Paper top-1 after 224px fine-tuning and ADE20K UperNet mIoU (single scale, multi-scale + flip), vil_spec.md §8.
PAPER_TOP1 = {'vil-t16_192px-pre_8xb128-20e_in1k-224px': 78.3, 'vil-s16_192px-pre_8xb128-20e_in1k-224px': 81.5,
              'vil-b16_192px-pre_8xb128-5e_in1k-224px': 82.4}
PAPER_MIOU = {'upernet_vil-t16_1xb16-160k_ade20k-512x512': (41.2, 43.1),
              'upernet_vil-s16_1xb16-160k_ade20k-512x512': (46.3, 47.9),
              'upernet_vil-b16_1xb16-160k_ade20k-512x512': (48.6, 49.6)}


def test_every_entry_names_its_config():
    entries = model_zoo.metafile_entries()
    assert len(entries) == 22  # 14 + the 8 high-resolution segmentation configs
    for name, entry in entries.items():
        assert osp.isfile(osp.join(ROOT, entry['Config'])), entry['Config']
        assert osp.splitext(osp.basename(entry['Config']))[0] == name


def test_mmpretrain_lists_and_builds_the_vil_classifiers():
    names = mmpretrain.list_models('vil-')
    assert len(names) == 6 and set(PAPER_TOP1) <= set(names)
    assert set(mmpretrain.list_models('vil-', task='Image Classification')) == set(PAPER_TOP1)
    for name, top1 in PAPER_TOP1.items():
        assert ModelHub.get(name).results[0].metrics == {'Top 1 Accuracy': top1}
    model = mmpretrain.get_model('vil-t16_192px-pre_8xb128-20e_in1k-224px')
    assert type(model.backbone).__name__ == 'ViL' and tuple(model.backbone.pos_embed.shape) == (1, 14, 14, 192)
    assert sum(p.numel() for p in model.parameters()) == 6_391_528  # the released ViL-T
    assert not any(ModelHub.has(name) for name in PAPER_MIOU)  # segmentation models stay out of MMPretrain


def test_segmentation_metafiles_carry_the_paper_miou():
    entries = model_zoo.metafile_entries()
    for name, (single, multi) in PAPER_MIOU.items():
        metrics = entries[name]['Results']['Metrics']
        assert (metrics['mIoU'], metrics['mIoU(ms+flip)']) == (single, multi)


def test_mmseg_inferencer_finds_the_configs_by_name():
    from mmseg.apis import MMSegInferencer

    inferencer = MMSegInferencer('upernet_vil-t16_1xb16-160k_ade20k-512x512', device='cpu')
    assert type(inferencer.model.backbone).__name__ == 'ViL'
    assert inferencer.cfg.filename == osp.join(ROOT, 'configs', 'vil', 'upernet_vil-t16_1xb16-160k_ade20k-512x512.py')


def test_mmseg_names_still_resolve_to_mmseg():
    own = SimpleNamespace(scope='mmseg')
    config, weights = BaseInferencer._load_model_from_metafile(own, 'pspnet_r18-d8_4xb2-80k_cityscapes-512x1024')
    assert config.filename.endswith('pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py') and 'pspnet' in weights
    with pytest.raises(ValueError, match='Cannot find model: no-such-model'):
        BaseInferencer._load_model_from_metafile(own, 'no-such-model')
    mmseg_names = {m['Name'].lower() for m in BaseInferencer._get_models_from_metafile(
        BaseInferencer._get_repo_or_mim_dir('mmseg'))}
    assert not mmseg_names & set(model_zoo.metafile_entries())  # ours never shadow theirs
