"""mmseg_vil.compat: the mmcv-lite ops fallback and weights-only loading of MMEngine checkpoints (resumed through
``mmseg_vil.engine.run_train``, the code behind ``tools/train.py --resume``)."""
import pickle
import sys
import uuid

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, MODELS
from mmengine.runner import load_checkpoint
from torch import nn
from torch.utils.data import Dataset

import mmseg_vil  # noqa: F401
from mmseg_vil import compat
from mmseg_vil.engine import run_train

LR = 1e-4
WARMUP_START, WARMUP_ITERS = 0.1, 10


def test_mmseg_and_mmpretrain_models_import():
    import mmpretrain.models  # noqa: F401
    import mmseg.models  # noqa: F401
    from mmseg.models.utils import point_sample  # noqa: F401  (an unconditional mmcv.ops import in mmseg)


@pytest.mark.skipif(compat.has_mmcv_ext(), reason='full mmcv installed: the fallback must not be used')
def test_fallback_point_sample_and_missing_ops():
    import mmcv.ops
    assert getattr(mmcv.ops, 'MMSEG_VIL_FALLBACK', False)
    image = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(5), indexing='ij')
    # pixel centres in normalised (x, y) coordinates sample the pixels exactly
    points = torch.stack([(cols + 0.5) / 5, (rows + 0.5) / 4], -1).reshape(1, -1, 2).repeat(2, 1, 1)
    torch.testing.assert_close(mmcv.ops.point_sample(image, points), image.flatten(2))
    # halfway between two pixel centres is their mean
    mid = mmcv.ops.point_sample(image, torch.tensor([[[1.0 / 5, 0.5 / 4]]]).repeat(2, 1, 1))
    torch.testing.assert_close(mid[..., 0], (image[:, :, 0, 0] + image[:, :, 0, 1]) / 2)
    with pytest.raises(AttributeError, match='full mmcv'):  # hasattr(mmcv.ops, 'nms') is False
        mmcv.ops.nms
    with pytest.raises(ModuleNotFoundError, match='full mmcv'):
        from mmcv.ops import DeformConv2d  # noqa: F401
    with pytest.raises(ModuleNotFoundError, match='full mmcv'):
        mmcv.ops.sigmoid_focal_loss(torch.zeros(1), torch.zeros(1))


def test_full_mmcv_is_left_untouched(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, 'mmcv.ops', sentinel)
    monkeypatch.setattr(compat, 'has_mmcv_ext', lambda: True)
    assert compat.install_mmcv_ops_fallback() is False
    assert sys.modules['mmcv.ops'] is sentinel


@MODELS.register_module(name='CompatToyModel', force=True)
class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(inputs).squeeze(1)
        return {'loss': ((out - labels) ** 2).mean()} if mode == 'loss' else out


@DATASETS.register_module(name='CompatToyData', force=True)
class ToyData(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([float(i), 1.0]), labels=torch.tensor(2.0 * i))


# What each training run found when it started: filled by RecordTrainStart (the Runner deep-copies its config and
# hooks, not this module's list).
TRAIN_STARTS = []


@HOOKS.register_module(name='CompatRecordTrainStart', force=True)
class RecordTrainStart(Hook):
    """Record iteration, lr, SGD momentum buffers and weights when training starts (after any resume)."""

    def before_train(self, runner) -> None:
        optimizer = runner.optim_wrapper.optimizer
        TRAIN_STARTS.append(dict(
            iter=runner.iter, lr=optimizer.param_groups[0]['lr'],
            momentum={key: state['momentum_buffer'].clone() for key, state in optimizer.state_dict()['state'].items()},
            weights={key: value.clone() for key, value in runner.model.state_dict().items()}))


def _train(work_dir, max_iters, resume=None):
    """Train the toy model with SGD + momentum and a linear lr warm-up, saving every 2 iterations."""
    cfg = Config(dict(
        model=dict(type='CompatToyModel'), work_dir=str(work_dir), experiment_name=f'toy-{uuid.uuid4().hex}',
        train_dataloader=dict(dataset=dict(type='CompatToyData'), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=4, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=LR, momentum=0.9)),
        param_scheduler=dict(type='LinearLR', start_factor=WARMUP_START, by_epoch=False, begin=0, end=WARMUP_ITERS),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        custom_hooks=[dict(type='CompatRecordTrainStart')], default_scope='mmengine', randomness=dict(seed=0)))
    return run_train(cfg, resume=resume)


@pytest.mark.parametrize('resume,start', [('auto', 4), ('iter_2.pth', 2)])
def test_resume_restores_iteration_optimizer_and_scheduler_under_weights_only(tmp_path, resume, start):
    """A resumed run starts where its checkpoint left off; a fresh run would start at iteration 0, without momentum
    and at the first lr of the warm-up. The checkpoints load with torch.load's weights-only default."""
    TRAIN_STARTS.clear()
    _train(tmp_path, 4)
    checkpoint_path = str(tmp_path / f'iter_{start}.pth')
    runner = _train(tmp_path, 6, resume=checkpoint_path if resume.endswith('.pth') else resume)
    fresh, resumed = TRAIN_STARTS
    checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=True)

    assert (fresh['iter'], resumed['iter'], checkpoint['meta']['iter']) == (0, start, start)
    for key, value in checkpoint['state_dict'].items():
        assert torch.equal(resumed['weights'][key], value), key
        assert not torch.equal(fresh['weights'][key], value), key
    saved_momentum = checkpoint['optimizer']['state']
    assert fresh['momentum'] == {} and resumed['momentum'].keys() == saved_momentum.keys() != set()
    for key, buffer in resumed['momentum'].items():
        assert torch.equal(buffer, saved_momentum[key]['momentum_buffer'])
    # LinearLR's factor after `start` steps: linear from start_factor to 1 over steps 0 .. end - begin - 1.
    assert fresh['lr'] == pytest.approx(LR * WARMUP_START)
    assert resumed['lr'] == pytest.approx(LR * (WARMUP_START + (1 - WARMUP_START) * start / (WARMUP_ITERS - 1)))
    assert runner.iter == 6 and runner.message_hub.get_scalar('train/loss').current() is not None


def test_checkpoint_with_a_foreign_object_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': ToyModel().state_dict(), 'meta': {'payload': ToyData()}}, path)
    with pytest.raises(pickle.UnpicklingError, match='ToyData'):
        load_checkpoint(ToyModel(), str(path))
