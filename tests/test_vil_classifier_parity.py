"""Official VisionLSTM2 / VisionLSTM classifier logits through MMPretrain: every classifier case of every fixture file.

Each case's official state dict is written as an official ``.pth`` and as a released ``.th`` (training-code names),
converted by tools/model_converters/vil2mmpretrain.py, loaded with MMEngine's own ``load_checkpoint`` (strict) into
an ``ImageClassifier`` built from the translated official options (``vil_config_from_official``) by MMPretrain's
registry, and run with ``mode='tensor'`` (logits) and ``mode='predict'`` (scores). The model is built for the grid
of the official model that ran (``eval_config``). See tests/data/vil_official/README*.md for what each case computed.
"""
import runpy
import sys
from pathlib import Path

import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from vil_official import official_to_released

from mmseg_vil.models.backbones.vil_options import vil_config_from_official
from mmseg_vil.models.classifier_checkpoint import load_vil_classifier_checkpoint, vil_classifier_state_dict
from mmseg_vil.utils.checkpoint import CheckpointMismatchError

ROOT = Path(__file__).parents[1]
FIXTURE_DIR = ROOT / 'tests' / 'data' / 'vil_official'
CONVERTER = ROOT / 'tools' / 'model_converters' / 'vil2mmpretrain.py'
TOL = dict(atol=1e-5, rtol=1e-4)


def _fixtures():
    return {path: torch.load(path, weights_only=True) for path in sorted(FIXTURE_DIR.glob('*.pt'))}


FIXTURES = _fixtures()
CASES = [pytest.param(path, name, id=f'{path.stem}:{name}') for path, fixture in FIXTURES.items()
         for name, case in fixture['cases'].items() if case['kind'] == 'classifier']


def official_class(path: Path, case: dict) -> str:
    return case.get('official_class', FIXTURES[path]['official_class'].rsplit('.', 1)[-1])


def classifier_cfg(case: dict, cls: str = 'VisionLSTM2') -> dict:
    """The MMPretrain ImageClassifier equivalent to the case's official model, built like the one that ran.

    A case with an official option that ViL refuses is skipped (test_vil_options.py checks the refusals).
    """
    try:
        translated = vil_config_from_official(case['config'], cls)
    except ValueError as err:
        pytest.skip(f'ViL refuses this case: {err}')
    shape = case.get('eval_config', case['config'])['input_shape']
    backbone = dict(translated['backbone'], img_size=tuple(shape[1:]), mlstm_backend='parallel')
    return dict(type='ImageClassifier', backbone=backbone, head=translated['head'])


def build_classifier(case: dict, cls: str = 'VisionLSTM2'):
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(classifier_cfg(case, cls))


def convert(src: Path, dst: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, 'argv', [str(CONVERTER), str(src), str(dst)])
    runpy.run_path(str(CONVERTER), run_name='__main__')


@pytest.mark.parametrize('layout', ['official', 'released'])
@pytest.mark.parametrize('path,name', CASES)
def test_classifier_parity_through_mmpretrain(tmp_path, monkeypatch, path, name, layout):
    case = FIXTURES[path]['cases'][name]
    cls = official_class(path, case)
    model = build_classifier(case, cls)
    source = tmp_path / f'{layout}.th'
    if layout == 'released':
        released = official_to_released(case['state_dict'], v1=cls == 'VisionLSTM')
        torch.save({'state_dict': released, 'ctor_kwargs': case['config']}, source)
    else:
        torch.save(case['state_dict'], source)
    converted = tmp_path / 'mmpretrain.pth'
    convert(source, converted, monkeypatch)

    load_checkpoint(model, str(converted), map_location='cpu', strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(case['input'], mode='tensor')
        samples = model(case['input'], [DataSample() for _ in case['input']], mode='predict')
    error = (logits - case['expected']).abs().max().item()
    print(f'{path.stem}:{name} [{layout}] max abs error {error:.3g}')
    torch.testing.assert_close(logits, case['expected'], **TOL)
    torch.testing.assert_close(torch.stack([s.pred_score for s in samples]), case['expected'].softmax(-1), **TOL)
    assert [s.pred_label.item() for s in samples] == case['expected'].argmax(-1).tolist()


@pytest.mark.parametrize('path,name', CASES)
def test_load_function_reads_official_state_dicts(path, name):
    """``load_vil_classifier_checkpoint`` takes the official state dict as is (no converter run)."""
    case = FIXTURES[path]['cases'][name]
    model = build_classifier(case, official_class(path, case)).eval()
    load_vil_classifier_checkpoint(model, case['state_dict'])
    with torch.no_grad():
        torch.testing.assert_close(model(case['input'], mode='tensor'), case['expected'], **TOL)


def test_classifier_cases_exist():
    assert CASES, f'no classifier case in the fixtures of {FIXTURE_DIR}'


def test_checkpoint_errors_name_the_problem():
    case = FIXTURES[FIXTURE_DIR / 'vil_official_parity.pt']['cases']['cls_square']
    backbone_only = {k: v for k, v in case['state_dict'].items() if not k.startswith(('head.', 'legacy_norm.'))}
    with pytest.raises(CheckpointMismatchError, match='no classifier'):
        vil_classifier_state_dict(backbone_only)
    wrong_classes = build_classifier({'config': {**case['config'], 'output_shape': (7, )}})
    with pytest.raises(CheckpointMismatchError, match=r'head\.fc\.weight \(10, 128\) vs model \(7, 128\)'):
        load_vil_classifier_checkpoint(wrong_classes, case['state_dict'])
