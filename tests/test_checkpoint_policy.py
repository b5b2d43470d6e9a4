"""The one checkpoint-loading policy (mmseg_vil.utils.checkpoint) in every entry point.

Each ordinary mistake (another number of classes, a bare backbone or classifier where a trained segmentor is
needed, another architecture) must stop train --load-from, test, infer (the APIs), compare and classify before any
work, with a message that lists the mismatches and names the fix; an explicit opt-in loads what fits and says what
stayed random. The models are the tiny ViL UperNet of the end-to-end tests and the demo DeiT.
"""
import logging
import os
import os.path as osp
import runpy
import sys

import pytest
import torch
from e2e_helpers import ROOT, TINY_CONFIG, data_root_options, make_ade20k, save_initialized_checkpoint
from mmengine.config import Config
from mmengine.logging import MMLogger

from mmseg_vil.apis import ModelSpec, compare, init_segmentor
from mmseg_vil.engine import load_config, run_test
from mmseg_vil.engine.cli import train_main
from mmseg_vil.utils.checkpoint import (CheckpointMismatchError, load_state_dict_strictly, read_checkpoint,
                                       read_conversion_source, read_state_dict)

DEIT_CONFIG = osp.join(ROOT, 'configs', 'demo', 'deit_demo.py')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """The tiny segmentor's checkpoint (150 classes), one of a 7-class variant, its bare backbone (what the
    converters write), an MMPretrain-style classifier (backbone.* + head.*) and a DeiT segmentor checkpoint."""
    tmp = tmp_path_factory.mktemp('checkpoints')
    good = save_initialized_checkpoint(str(tmp / 'good.pth'))
    seven = save_initialized_checkpoint(str(tmp / 'seven_classes.pth'), seed=1, **{
        'decode_head.num_classes': 7, 'auxiliary_head.num_classes': 7})
    state_dict = torch.load(good, weights_only=True)['state_dict']
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    torch.save(backbone, tmp / 'backbone.pth')
    classifier = {**{f'backbone.{k}': v for k, v in backbone.items()}, 'head.fc.weight': torch.zeros(10, 64),
                  'head.fc.bias': torch.zeros(10)}
    torch.save({'state_dict': classifier}, tmp / 'classifier.pth')
    deit = save_initialized_checkpoint(str(tmp / 'deit.pth'), DEIT_CONFIG)
    return dict(good=good, seven=seven, backbone=str(tmp / 'backbone.pth'), classifier=str(tmp / 'classifier.pth'),
                deit=deit, data=make_ade20k(str(tmp / 'ADEChallengeData2016')))


def _refusal(files, name, **kwargs) -> str:
    with pytest.raises(CheckpointMismatchError) as error:
        init_segmentor(TINY_CONFIG, files[name], device='cpu', **kwargs)
    message = str(error.value)
    assert message.startswith(f'{files[name]} does not fit EncoderDecoder (nothing loaded)')
    return message


def test_other_number_of_classes(files):
    message = _refusal(files, 'seven')
    assert 'shape mismatch (4): decode_head.conv_seg.weight (7, 16, 1, 1) vs model (150, 16, 1, 1)' in message
    assert ('likely fix: another number of classes (decode_head: 7 in the checkpoint, 150 in the config, '
            'auxiliary_head: 7 in the checkpoint, 150 in the config)') in message
    assert 'model.decode_head.num_classes=7 model.auxiliary_head.num_classes=7' in message


def test_bare_backbone(files):
    message = _refusal(files, 'backbone')
    assert 'missing (' in message and 'unexpected (' in message
    assert 'the checkpoint holds bare backbone weights' in message
    assert "model.backbone.init_cfg=dict(type='Pretrained', checkpoint=PATH)" in message


def test_classifier(files):
    message = _refusal(files, 'classifier')
    assert 'no weights for neck, decode_head, auxiliary_head' in message
    assert "init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix='backbone.')" in message


def test_other_architecture_is_named_not_a_crash(files):
    """ViL's position-embedding resampling used to crash on DeiT's (1, N, D) embedding ("permute(sparse_coo)")."""
    message = _refusal(files, 'deit')
    assert ('the checkpoint holds a ViT/DeiT (self-attention) model, but the config builds a ViL (Vision-LSTM) '
            'one') in message
    assert 'backbone.pos_embed (1, 65, 64) vs model (1, 4, 4, 32)' in message


def test_partial_load_is_explicit(files):
    model = init_segmentor(TINY_CONFIG, files['seven'], device='cpu', allow_partial=True)
    loaded = torch.load(files['seven'], weights_only=True)['state_dict']
    for key, value in model.state_dict().items():
        if '.conv_seg.' in key:  # the class layers keep the model's 150 classes, randomly initialised
            assert value.shape[0] == 150 and loaded[key].shape[0] == 7, key
        else:
            assert torch.equal(value, loaded[key]), key
    with pytest.raises(CheckpointMismatchError, match='nothing in it matches, so even a partial load is refused'):
        init_segmentor(TINY_CONFIG, files['deit'], device='cpu', allow_partial=True)


def test_partial_load_logs_what_stayed_random(files):
    model = init_segmentor(TINY_CONFIG, files['good'], device='cpu')
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        load_state_dict_strictly(model, torch.load(files['seven'], weights_only=True)['state_dict'], 'seven.pth',
                                 allow_partial=True)
    finally:
        logger.removeHandler(handler)
    message = '\n'.join(r.getMessage() for r in records)
    assert 'Partial load of seven.pth into EncoderDecoder, allowed explicitly' in message
    assert 'shape mismatch (4): decode_head.conv_seg.weight (7, 16, 1, 1) vs model (150, 16, 1, 1)' in message


def test_test_tool_refuses_before_evaluating(files, tmp_path):
    cfg = load_config(TINY_CONFIG, str(tmp_path / 'work'),
                      dict(option.split('=', 1) for option in data_root_options(files['data'])))
    with pytest.raises(CheckpointMismatchError, match='another number of classes'):
        run_test(cfg, files['seven'])
    written = [f for _, _, names in os.walk(tmp_path / 'work') for f in names if f.endswith('.json')]
    assert written == []  # neither metrics nor an evaluation log


def test_train_load_from_refuses_before_training(files, tmp_path):
    work_dir = tmp_path / 'work'
    with pytest.raises(SystemExit) as exit_info:
        train_main([TINY_CONFIG, '--work-dir', str(work_dir), '--load-from', files['backbone'], '--cfg-options',
                    *data_root_options(files['data'])])
    message = exit_info.value.code  # sys.exit(message): exit status 1
    assert ': error: ' in message and 'the checkpoint holds bare backbone weights' in message
    assert not list(work_dir.glob('*.pth'))


def test_compare_loads_every_checkpoint_before_evaluating(files, monkeypatch):
    def no_evaluation(*args, **kwargs):
        raise AssertionError('evaluated before every checkpoint was checked')

    monkeypatch.setattr(sys.modules['mmseg_vil.apis.compare'], 'evaluate_model', no_evaluation)
    specs = [ModelSpec('good', config=TINY_CONFIG, checkpoint=files['good']),
             ModelSpec('wrong', config=TINY_CONFIG, checkpoint=files['seven'])]
    with pytest.raises(CheckpointMismatchError, match='seven_classes.pth does not fit'):
        compare(specs, device='cpu')


def test_compile_option_compiles_the_inference_model(files):
    """``--cfg-options compile=True`` of tools/infer.py reaches the model (not silently ignored); the config is kept."""
    config = Config.fromfile(TINY_CONFIG)
    model = init_segmentor(config, files['good'], device='cpu', cfg_options={'compile': True})
    assert model.backbone._compiled_call_impl is not None
    assert hasattr(model.decode_head.forward, '_torchdynamo_orig_callable')
    assert 'compile' not in config
    eager = init_segmentor(config, files['good'], device='cpu')
    assert eager.backbone._compiled_call_impl is None


@pytest.mark.parametrize('content', [b'hello', b'\x80\x02}q\x00(X\x01\x00\x00\x00a', os.urandom(64)])
def test_file_that_is_no_checkpoint_is_named(tmp_path, content):
    """Other bytes used to escape the unpickler as a bare KeyError or IndexError traceback."""
    path = tmp_path / 'notes.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointMismatchError, match=f'{path} is not a readable weights-only PyTorch checkpoint'):
        read_checkpoint(str(path))


def test_test_and_train_read_the_checkpoint_before_building(files, tmp_path, monkeypatch):
    not_a_checkpoint = tmp_path / 'notes.pth'
    not_a_checkpoint.write_text('hello')
    monkeypatch.setattr('mmseg_vil.engine.entrypoints.build_runner', lambda cfg: pytest.fail('a Runner was built'))
    cfg = load_config(TINY_CONFIG, str(tmp_path / 'test'))
    with pytest.raises(CheckpointMismatchError, match='notes.pth is not a readable'):
        run_test(cfg, str(not_a_checkpoint))
    with pytest.raises(SystemExit) as exit_info:
        train_main([TINY_CONFIG, '--work-dir', str(tmp_path / 'train'), '--load-from', str(not_a_checkpoint)])
    assert ': error: ' in exit_info.value.code and 'notes.pth is not a readable' in exit_info.value.code


def test_converters_replace_no_file(files, tmp_path):
    source = files['backbone']
    with pytest.raises(ValueError, match='missing.pth: no such checkpoint file'):
        read_conversion_source(str(tmp_path / 'missing.pth'), str(tmp_path / 'out.pth'))
    with pytest.raises(ValueError, match='is the source checkpoint: the converter writes a new file'):
        read_conversion_source(source, source)
    config = tmp_path / 'config.py'
    config.write_text('model = dict()')
    with pytest.raises(ValueError, match='config.py exists: the converter writes a new file'):
        read_conversion_source(source, str(config))
    assert config.read_text() == 'model = dict()'
    assert read_conversion_source(source, str(tmp_path / 'out.pth')).keys() == read_state_dict(source).keys()


def test_converter_tool_names_a_refused_source(files, tmp_path, monkeypatch, capsys):
    converter = osp.join(ROOT, 'tools', 'model_converters', 'vil2mmpretrain.py')
    monkeypatch.setattr(sys, 'argv', [converter, files['backbone'], str(tmp_path / 'out.pth')])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(converter, run_name='__main__')
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback
    assert 'vil2mmpretrain.py: error: ' in capsys.readouterr().err and not osp.exists(tmp_path / 'out.pth')
