"""``compile`` in a training config compiles the backbone and heads (not MMEngine's train_step) and changes nothing
else: the same losses as an eager run, the same checkpoint keys."""
import math
import os.path as osp

import pytest
import torch
from e2e_helpers import TINY_CONFIG, make_ade20k

from mmseg_vil.engine import load_config, run_train
from mmseg_vil.engine import compile as compile_module
from mmseg_vil.engine.compile import take_compile_options


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
    return make_ade20k(str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016'))


def _train(ade_root, work_dir, **options):
    cfg_options = {f'{loader}.dataset.data_root': ade_root for loader in ('train_dataloader', 'val_dataloader')}
    cfg_options.update({'train_cfg.max_iters': 2, 'train_cfg.val_interval': 100, 'default_hooks.checkpoint.interval': 2,
                        **options})
    runner = run_train(load_config(TINY_CONFIG, str(work_dir), cfg_options))
    return runner, runner.message_hub.get_scalar('train/loss').data[0]


def test_compile_option_compiles_parts_and_trains_like_eager(ade_root, tmp_path):
    torch.manual_seed(0)
    eager, eager_losses = _train(ade_root, tmp_path / 'eager')
    torch.manual_seed(0)
    compiled, compiled_losses = _train(ade_root, tmp_path / 'compiled', compile=dict(backend='aot_eager'))
    model = compiled.model
    assert model.backbone._compiled_call_impl is not None  # nn.Module.compile: the backbone runs compiled
    assert hasattr(model.decode_head.forward, '_torchdynamo_orig_callable')
    assert not hasattr(model.train_step, '_torchdynamo_orig_callable')  # MMEngine's train_step left alone
    assert len(compiled_losses) == 2 and all(math.isfinite(v) for v in compiled_losses)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    checkpoint = torch.load(osp.join(tmp_path / 'compiled', 'iter_2.pth'), weights_only=True, map_location='cpu')
    assert set(checkpoint['state_dict']) == set(eager.model.state_dict())  # no _orig_mod prefixes


@pytest.mark.parametrize('value,expected', [(True, {}), (False, None), (None, None),
                                            (dict(mode='reduce-overhead'), {'mode': 'reduce-overhead'}),
                                            ('reduce-overhead', {'mode': 'reduce-overhead'})])
def test_compile_options_are_taken_out_of_the_config(value, expected):
    cfg = load_config(TINY_CONFIG)
    if value is not None:
        cfg.compile = value
    assert take_compile_options(cfg) == expected
    assert 'compile' not in cfg


@pytest.mark.parametrize('value', ['yes', "dict(mode='reduce-overhead')", 3])
def test_compile_option_of_the_wrong_type_is_refused(value):
    """E.g. ``--cfg-options "compile=dict(mode='reduce-overhead')"``, which MMEngine passes on as a string: the error
    names the command-line forms that work."""
    cfg = load_config(TINY_CONFIG)
    cfg.compile = value
    with pytest.raises(TypeError, match=r'compile must be True, False, a torch.compile mode .* compile\.mode='):
        take_compile_options(cfg)


def test_cuda_graph_modes_compile_the_training_steps_only(ade_root, tmp_path, monkeypatch):
    """With CUDA graphs each part runs compiled while it trains with gradients, eagerly when it evaluates (here
    after the last iteration): the same losses as eager training either way."""
    calls = []

    def recording_compile(fn, **options):
        assert options == dict(mode='reduce-overhead', backend='aot_eager')

        def compiled(*args, **kwargs):
            calls.append((fn.__self__.__class__.__name__, torch.is_grad_enabled()))
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setattr(compile_module.torch, 'compile', recording_compile)
    torch.manual_seed(0)
    eager, eager_losses = _train(ade_root, tmp_path / 'eager')
    torch.manual_seed(0)
    runner, losses = _train(ade_root, tmp_path / 'graphs', compile=dict(mode='reduce-overhead', backend='aot_eager'),
                            **{'train_cfg.val_interval': 2})
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    parts = {type(getattr(runner.model, name)).__name__ for name in ('backbone', 'decode_head', 'auxiliary_head')
             if getattr(runner.model, name, None) is not None}
    assert {name for name, _ in calls} == parts and all(grad for _, grad in calls)  # 2 training steps, no validation
    assert len(calls) == 2 * len(parts)
    assert runner.message_hub.get_scalar('val/mIoU') is not None  # validation ran, eagerly


def test_compiled_vil_inference_matches_eager():
    """No-grad inference takes its own fast paths (e.g. biases added by ``out=`` copies), which Inductor must trace;
    width 64: two q/k/v tiles per head, whose head-layout view once failed to compile."""
    from mmseg_vil.models.backbones.vil import ViL
    torch.manual_seed(0)
    model = ViL(arch=dict(embed_dims=64, num_layers=2), img_size=64, out_indices=(0, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)(x)
    for out, exp in zip(compiled, expected):
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-5)
