"""mmseg_vil.compat: the mmcv-lite ops fallback and weights-only loading of MMEngine checkpoints."""
import pickle
import sys

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from torch import nn
from torch.utils.data import Dataset

import mmseg_vil  # noqa: F401
from mmseg_vil import compat


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


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(inputs).squeeze(1)
        return {'loss': ((out - labels) ** 2).mean()} if mode == 'loss' else out


class ToyData(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([float(i), 1.0]), labels=torch.tensor(2.0 * i))


def _runner(work_dir, max_iters, resume=False):
    return Runner(model=ToyModel(), work_dir=str(work_dir), experiment_name=f'toy{max_iters}{resume}',
                  train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                                        batch_size=4, collate_fn=dict(type='default_collate')),
                  optim_wrapper=dict(optimizer=dict(type='SGD', lr=1e-3)),
                  train_cfg=dict(by_epoch=False, max_iters=max_iters),
                  default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
                  resume=resume, default_scope='mmengine')


def test_runner_checkpoint_resumes_under_weights_only(tmp_path):
    _runner(tmp_path, 4).train()
    resumed = _runner(tmp_path, 6, resume=True)
    resumed.train()
    assert resumed.iter == 6
    assert resumed.message_hub.get_scalar('train/loss').current() is not None


def test_checkpoint_with_a_foreign_object_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': ToyModel().state_dict(), 'meta': {'payload': ToyData()}}, path)
    with pytest.raises(pickle.UnpicklingError, match='ToyData'):
        load_checkpoint(ToyModel(), str(path))
