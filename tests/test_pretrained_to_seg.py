"""A segmentation model starts from an ImageNet ViL classifier: an MMPretrain checkpoint (``prefix='backbone.'``)
or a released ``.th`` file. The backbone must receive every pretrained tensor unchanged, except the position
embedding, which is resampled bicubically to the segmentation grid; the classifier's head and final norm stay out.
"""
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
from vil_official import official_to_released

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / 'tests' / 'data' / 'vil_official' / 'vil_official_parity.pt'
CONVERTER = ROOT / 'tools' / 'model_converters' / 'vil2mmpretrain.py'
SEG_SIZE = 96  # the classifier was built at 64px: 4x4 -> 6x6 tokens


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """The fixture's official classifier as a released ``.th`` and, converted from it, an MMPretrain checkpoint."""
    tmp = tmp_path_factory.mktemp('vil_seg_init')
    case = torch.load(FIXTURE, weights_only=True)['cases']['cls_square']
    released = tmp / 'vil2_classifier.th'
    torch.save({'state_dict': official_to_released(case['state_dict'])}, released)
    mmpretrain = tmp / 'vil_mmpretrain.pth'
    argv = sys.argv
    sys.argv = [str(CONVERTER), str(released), str(mmpretrain)]
    try:
        runpy.run_path(str(CONVERTER), run_name='__main__')
    finally:
        sys.argv = argv
    return dict(config=case['config'], official=case['state_dict'], released=released, mmpretrain=mmpretrain)


def segmentor(config: dict, init_cfg: dict):
    """A small EncoderDecoder on the checkpoint's ViL, as a segmentation config would define it."""
    dim = config['dim']
    cfg = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, size=(SEG_SIZE, SEG_SIZE)),
        backbone=dict(type='ViL', arch=dict(embed_dims=dim, num_layers=2 * config['depth']), img_size=SEG_SIZE,
                      patch_size=config['patch_size'], out_indices=(3, 5, 7), final_norm=False, init_cfg=init_cfg),
        decode_head=dict(type='FCNHead', in_channels=dim, in_index=2, channels=16, num_convs=1, concat_input=False,
                         num_classes=5, norm_cfg=dict(type='BN', requires_grad=True)))
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg)
    model.init_weights()
    return model


def resized_pos_embed(pos_embed: torch.Tensor, size: int) -> torch.Tensor:
    grid = (size // 16, size // 16)
    return F.interpolate(pos_embed.permute(0, 3, 1, 2), size=grid, mode='bicubic',
                         align_corners=False).permute(0, 2, 3, 1)


def test_mmpretrain_checkpoint_initialises_the_segmentation_backbone(checkpoints):
    model = segmentor(checkpoints['config'], dict(type='Pretrained', checkpoint=str(checkpoints['mmpretrain']),
                                                  prefix='backbone.'))
    source = torch.load(checkpoints['mmpretrain'], weights_only=True)['state_dict']
    backbone = model.backbone.state_dict()
    expected_keys = {k[len('backbone.'):] for k in source if k.startswith('backbone.')} - {'norm.weight', 'norm.bias'}
    assert set(backbone) == expected_keys  # no final norm, no classifier head in the segmentor's backbone
    for key, value in backbone.items():
        pretrained = source[f'backbone.{key}']
        if key == 'pos_embed':
            assert value.shape == (1, SEG_SIZE // 16, SEG_SIZE // 16, checkpoints['config']['dim'])
            pretrained = resized_pos_embed(pretrained, SEG_SIZE)
        torch.testing.assert_close(value, pretrained, rtol=0, atol=0, msg=key)
    # and the values are the official ones (residual-weight norms stored as 1 + offset)
    official = checkpoints['official']
    torch.testing.assert_close(backbone['layers.3.mixer.proj_down.weight'],
                               official['blocks.1.rowwise_from_bot_right.layer.proj_down.weight'], rtol=0, atol=0)
    torch.testing.assert_close(backbone['layers.2.norm.weight'],
                               official['blocks.1.rowwise_from_top_left.norm.weight'] + 1, rtol=0, atol=0)

    with torch.no_grad():
        logits = model(torch.randn(1, 3, SEG_SIZE, SEG_SIZE), mode='tensor')
    assert logits.shape == (1, 5, SEG_SIZE // 16, SEG_SIZE // 16) and torch.isfinite(logits).all()


def test_released_th_gives_the_same_backbone(checkpoints):
    from_th = segmentor(checkpoints['config'], dict(type='Pretrained', checkpoint=str(checkpoints['released'])))
    from_mmpretrain = segmentor(checkpoints['config'], dict(type='Pretrained',
                                                            checkpoint=str(checkpoints['mmpretrain']),
                                                            prefix='backbone.'))
    expected = from_mmpretrain.backbone.state_dict()
    for key, value in from_th.backbone.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
