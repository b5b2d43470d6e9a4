"""Parity with the official VisionLSTM2 / VisionLSTM: every case of every fixture file in tests/data/vil_official/.

A case runs whenever :func:`vil_config_from_official` supports every official option it records (its ``config``);
otherwise it is skipped with the refusal, which must name the option. Each case's official state dict is written to
disk in every documented key layout (official, released training-code names, ours) and loaded through
``init_cfg=dict(type='Pretrained')``, the code path users take. See tests/data/vil_official/README*.md for what each
case computed.
"""
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from mmseg_vil.models.backbones.vil import ViL
from mmseg_vil.models.backbones.vil_checkpoint import (convert_vil_state_dict, detect_vil_format,
                                                      split_backbone_and_head)
from mmseg_vil.models.backbones.vil_options import vil_config_from_official
from mmseg_vil.models.heads.vil_cls_head import ViLClsHead
from mmseg_vil.utils.checkpoint import read_state_dict
from vil_official import official_to_released

FIXTURE_DIR = Path(__file__).parent / 'data' / 'vil_official'
# Files of this repository: all their cases must run. Other files may hold options ViL refuses (skipped).
COMMITTED = ('vil_official_parity.pt', 'vil_official_options.pt')
TOL = dict(atol=1e-5, rtol=1e-4)
LAYOUTS = {'official': ('official', 'official_v1'), 'released': ('released', 'released_v1'), 'ours': ('ours', )}


@lru_cache(maxsize=None)
def load_fixture(path: Path) -> dict:
    fixture = torch.load(path, weights_only=True)
    assert fixture['format'] == 'vil-parity-v1', path
    return fixture


def _cases():
    for path in sorted(FIXTURE_DIR.glob('*.pt')):
        for name in load_fixture(path)['cases']:
            yield pytest.param(path, name, id=f'{path.stem}:{name}')


CASES = list(_cases())


def official_class(path: Path, case: dict) -> str:
    return case.get('official_class', load_fixture(path)['official_class'].rsplit('.', 1)[-1])


def translate(path: Path, case: dict) -> dict:
    """Our configs for the case, or a skip naming the unsupported official option."""
    try:
        return vil_config_from_official(case['config'], official_class(path, case))
    except ValueError as err:
        assert 'official option' in str(err) or 'has no option' in str(err), err
        pytest.skip(f'ViL refuses this case: {err}')


def write_checkpoint(case: dict, v1: bool, layout: str, directory: Path) -> Path:
    """The case's state dict in ``layout``; 'ours' is converted once here and must load without a second one."""
    state_dict = case['state_dict']
    if layout == 'released':
        state_dict = {'state_dict': official_to_released(state_dict, v1=v1)}
    elif layout == 'ours':
        state_dict = {'state_dict': convert_vil_state_dict(state_dict)}
    path = directory / f'{layout}.pth'
    torch.save(state_dict, path)
    assert detect_vil_format(read_state_dict(str(path))) in LAYOUTS[layout]
    return path


@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('path,name', CASES)
def test_official_parity(tmp_path, path, name, layout):
    check_official_parity(tmp_path, path, name, layout)


@pytest.mark.parametrize('path,name', CASES)
def test_official_parity_with_chunkwise_inference_path(tmp_path, path, name):
    """The chunkwise backend without autograd on the CPU runs the mixer's inference path (vil_block.MLSTMMixer)."""
    check_official_parity(tmp_path, path, name, 'ours', mlstm_backend='chunkwise')


def check_official_parity(tmp_path: Path, path: Path, name: str, layout: str, mlstm_backend: str = 'parallel',
                          device: str = 'cpu') -> None:
    """The case's outputs from its checkpoint in ``layout``, with the given mLSTM backend (the Triton backends run
    from tests/test_mixer_ops.py on CUDA or under the interpreter)."""
    case = load_fixture(path)['cases'][name]
    config = translate(path, case)
    checkpoint = write_checkpoint(case, official_class(path, case) == 'VisionLSTM', layout, tmp_path)
    # Built like the official model that ran: at the input's grid where the case says so (eval_config).
    shape = case.get('eval_config', case['config'])['input_shape']
    backbone_cfg = {k: v for k, v in config['backbone'].items() if k != 'type'}
    backbone_cfg.update(img_size=tuple(shape[1:]), mlstm_backend=mlstm_backend,
                        init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))

    def build(**overrides):
        model = ViL(**{**backbone_cfg, **overrides})
        model.init_weights()
        return model.to(device).eval()

    x = case['input'].to(device)
    with torch.no_grad():
        model = build()
        output = model(x)[0].cpu()
        if 'block_outputs' in case:
            raw = [block.cpu() for block in build(out_indices=range(model.num_layers), out_type='raw',
                                                  final_norm=False, out_norm=False)(x)]
            assert len(raw) == len(case['block_outputs'])
            for i, (ours, expected) in enumerate(zip(raw, case['block_outputs'])):
                torch.testing.assert_close(ours, expected, **TOL, msg=lambda m: f'block {i}: {m}')
        if 'final_norm_output' in case:
            assert backbone_cfg['final_norm'], 'the fixture records a final norm that the translation dropped'
            tokens = build(out_type='raw', out_norm=False)(x)[0].cpu()
            torch.testing.assert_close(tokens, case['final_norm_output'], **TOL)
        if config['head'] is not None:
            head = ViLClsHead(**{k: v for k, v in config['head'].items() if k != 'type'}).eval()
            _, head_state = split_backbone_and_head(convert_vil_state_dict(read_state_dict(str(checkpoint))))
            head.load_state_dict(head_state)
            output = head.fc(head.pre_logits((output, )))
    torch.testing.assert_close(output, case['expected'], **TOL)
    if 'drop_path_rates' in case:
        rates = [layer.drop_path.drop_prob for layer in model.layers]
        assert rates == pytest.approx(case['drop_path_rates'], abs=1e-7)


def _assert_same_distribution(ours: torch.Tensor, official: torch.Tensor, key: str) -> None:
    """Equal tensors (deterministic inits), or the same mean and std up to five standard errors."""
    assert ours.shape == official.shape, key
    if torch.equal(ours, official):
        return
    n = official.numel()
    spread = max(ours.std().item(), official.std().item()) if n > 1 else 0.0
    assert abs(ours.mean().item() - official.mean().item()) <= 5 * spread / n**0.5 + 1e-7, key
    if n > 1:
        assert abs(ours.std().item() - official.std().item()) <= 5 * spread / (2 * n)**0.5 + 1e-7, key


@pytest.mark.parametrize('path,name', [case for case in CASES if 'init_state_dict' in
                                       load_fixture(case.values[0])['cases'][case.values[1]]])
def test_official_init(path, name):
    """Our initialisation draws every parameter from the official distribution (seeded: deterministic test)."""
    case = load_fixture(path)['cases'][name]
    config = translate(path, case)
    torch.manual_seed(0)
    model = ViL(**{k: v for k, v in config['backbone'].items() if k != 'type'})
    official_backbone, official_head = split_backbone_and_head(convert_vil_state_dict(case['init_state_dict']))
    ours = model.state_dict()
    assert ours.keys() == official_backbone.keys()
    if config['head'] is not None:
        head = ViLClsHead(**{k: v for k, v in config['head'].items() if k != 'type'})
        head.init_weights()
        ours.update({f'head.{k}': v for k, v in head.state_dict().items()})
        official_backbone.update({f'head.{k}': v for k, v in official_head.items()})
    for key, official in official_backbone.items():
        _assert_same_distribution(ours[key], official, key)


def test_committed_fixture_files_are_fully_supported():
    """Skipping is for foreign fixture files: every case of this repository's files must run."""
    for file_name in COMMITTED:
        path = FIXTURE_DIR / file_name
        for case in load_fixture(path)['cases'].values():
            vil_config_from_official(case['config'], official_class(path, case))


def test_fixture_folder_is_not_empty():
    assert CASES, f'no parity fixtures in {FIXTURE_DIR}'
