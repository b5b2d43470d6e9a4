"""Write ``vim_official_options.pt``: outputs of the official Vision Mamba code for its constructor options.

    python tests/data/vim_official/generate_options.py OFFICIAL_ROOT [--out vim_official_options.pt]

``OFFICIAL_ROOT`` is a checkout of github.com/hustvl/Vim (commit in ``OFFICIAL_COMMIT``) holding ``vim/``,
``mamba-1p1p1/mamba_ssm`` and ``causal-conv1d/causal_conv1d``; nothing of it is copied into this repository. The
official model code runs unmodified on CPU in float32. Its CUDA / Triton kernels are replaced by the packages' own
pure-PyTorch reference functions, and the modules it imports but does not use for these computations (timm,
transformers, the compiled CUDA extensions) by the minimal stand-ins below; README_options.md lists them.
"""
import argparse
import inspect
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

OFFICIAL_COMMIT = 'dd0358ad1e42701f22afbefa0717cc8825cf9f45'
# The released models' flags (vim_spec.md §1) at a tiny size: 4x4 grid of 8-pixel patches, 3 layers.
BASE = dict(img_size=32, patch_size=8, stride=8, embed_dim=16, depth=3, num_classes=10, rms_norm=True,
            residual_in_fp32=True, fused_add_norm=True, final_pool_type='mean', if_abs_pos_embed=True, if_rope=False,
            if_rope_residual=False, bimamba_type='v2', if_cls_token=True, if_divide_out=True,
            use_middle_cls_token=True)
NO_CLS = dict(if_cls_token=False, use_middle_cls_token=False)
CASES = {  # name: (kwargs over BASE, seed)
    'state8_conv3_expand1_rank3': (dict(d_state=8, ssm_cfg=dict(d_conv=3, expand=1, dt_rank=3)), 30),
    'layernorm_residual_input_dtype': (dict(rms_norm=False, residual_in_fp32=False), 31),
    'head_cls_token': (dict(use_middle_cls_token=False), 32),
    'double_cls_token': (dict(use_double_cls_token=True, use_middle_cls_token=False), 33),
    'no_cls_mean_pool': (dict(NO_CLS, final_pool_type='mean'), 34),
    'no_cls_last_token': (dict(NO_CLS, final_pool_type='none'), 35),
    'no_abs_pos_embed': (dict(if_abs_pos_embed=False), 36),
    'rope_mid_cls': (dict(if_rope=True), 37),
    'rope_residual_no_cls': (dict(NO_CLS, if_rope=True, if_rope_residual=True, pt_hw_seq_len=6), 38),
    'sum_directions': (dict(if_divide_out=False), 39),
    'bimamba_v1': (dict(bimamba_type='v1'), 40),
    'bimamba_none': (dict(bimamba_type='none'), 41),
    'patch16_stride8': (dict(img_size=48, patch_size=16, stride=8), 42),
    'layer_scale': (dict(init_layer_scale=0.5), 43),
}


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class _DropPath(nn.Module):
    """timm's DropPath: per-sample residual drop with 1 / (1 - p) scaling while training, identity in eval."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


def _lecun_normal_(tensor):
    fan_in = math.prod(tensor.shape[1:])
    return nn.init.trunc_normal_(tensor, std=math.sqrt(1 / fan_in) / .87962566103423978)


def install_stand_ins() -> None:
    """Modules the official files import: timm's few helpers, transformers' names, the CUDA extension modules."""
    _module('timm')
    _module('timm.models')
    _module('timm.models.vision_transformer', VisionTransformer=nn.Module, _cfg=lambda **kw: kw,
            _load_weights=None)
    _module('timm.models.registry', register_model=lambda fn: fn)
    _module('timm.models.layers', trunc_normal_=nn.init.trunc_normal_, lecun_normal_=_lecun_normal_,
            DropPath=_DropPath, to_2tuple=lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x))
    _module('transformers')
    _module('transformers.generation', GreedySearchDecoderOnlyOutput=None, SampleDecoderOnlyOutput=None,
            TextStreamer=None)
    _module('transformers.utils', WEIGHTS_NAME='pytorch_model.bin', CONFIG_NAME='config.json')
    _module('transformers.utils.hub', cached_file=None)
    _module('selective_scan_cuda')
    _module('causal_conv1d_cuda')


def redirect_kernels() -> None:
    """Point the official modules' kernel entry points at the official pure-PyTorch references."""
    import models_mamba
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops import selective_scan_interface as ssi
    from mamba_ssm.ops.triton import layer_norm

    def causal_conv1d_fn(x, weight, bias=None, activation=None):
        # The signature the mamba-1p1p1 references call (activation 4th); the bundled causal-conv1d's reference
        # takes other arguments there.
        return causal_conv1d_ref(x, weight, bias, activation=activation)

    ssi.causal_conv1d_fn = causal_conv1d_fn
    ssi.selective_scan_fn = ssi.selective_scan_ref

    def inner_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None,
                          D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
        # mamba_inner_ref with an identity out_proj (exact in float32), returned channels-first like the kernel.
        identity = torch.eye(xz.shape[1] // 2, dtype=xz.dtype)
        out = ssi.mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, identity, None,
                                  A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus)
        return out.transpose(1, 2)

    mamba_simple.mamba_inner_fn_no_out_proj = inner_no_out_proj
    mamba_simple.mamba_inner_fn = ssi.mamba_inner_ref
    mamba_simple.bimamba_inner_fn = ssi.bimamba_inner_ref

    def fused(reference):
        """The fused add + norm kernel's contract: norm(x + residual) in float32, and the sum if prenorm."""
        def norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6, **_):
            out, summed = reference(x, weight, bias, residual=residual, eps=eps, prenorm=True, upcast=True)
            summed = summed if residual_in_fp32 else summed.to(x.dtype)
            return (out, summed) if prenorm else out
        return norm_fn

    for module in (models_mamba, layer_norm):
        module.rms_norm_fn = fused(layer_norm.rms_norm_ref)
        module.layer_norm_fn = fused(layer_norm.layer_norm_ref)


def perturb_(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 123)
    with torch.no_grad():
        for param in model.parameters():
            param += (0.1 if param.dim() == 1 else 0.02) * torch.randn(param.shape, generator=gen)


def run_case(VisionMamba, name: str, kwargs: dict, seed: int) -> dict:
    params = inspect.signature(VisionMamba.__init__).parameters
    config = {key: kwargs.get(key, p.default) for key, p in params.items() if key not in ('self', 'kwargs')}
    torch.manual_seed(seed)
    model = VisionMamba(**config)
    perturb_(model, seed)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    hidden, residual = [], []

    def record(module, inputs, outputs):  # returns None: the layer's outputs stay as they are
        hidden.append(outputs[0])
        residual.append(outputs[1])

    for layer in model.layers:
        layer.register_forward_hook(record)
    size = config['img_size']
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 777))
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert torch.equal(model.head(features), logits)
    return dict(kind='classifier', config=config, state_dict=state_dict, input=x, expected=logits,
                expected_note='logits of the official VisionMamba(**config) in eval mode, input at img_size',
                expected_forward_features=features,
                layer_outputs={'hidden': torch.stack(hidden[:config['depth']]),
                               'residual': torch.stack(residual[:config['depth']])},
                weights_note=f'torch.manual_seed({seed}); official init; every parameter += 0.1 (1-D) or 0.02 '
                             f'(else) * randn, generator seed {seed + 123}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('official_root', help='checkout of hustvl/Vim')
    parser.add_argument('--out', default=str(Path(__file__).with_name('vim_official_options.pt')))
    args = parser.parse_args()
    root = Path(args.official_root)
    sys.path[:0] = [str(root / 'vim'), str(root / 'mamba-1p1p1'), str(root / 'causal-conv1d')]
    install_stand_ins()
    redirect_kernels()
    from models_mamba import VisionMamba

    torch.set_num_threads(1)
    cases = {name: run_case(VisionMamba, name, dict(BASE, **kwargs), seed) for name, (kwargs, seed) in CASES.items()}
    fixture = {'format': 'vim-parity-v1', 'official_commit': OFFICIAL_COMMIT,
               'environment': {'torch': str(torch.__version__), 'timm': 'stand-in (generate_options.py)',
                               'dtype': 'float32', 'device': 'cpu', 'generator': 'generate_options.py'},
               'cases': cases}
    torch.save(fixture, args.out)
    print(f'{args.out}: {len(cases)} cases')


if __name__ == '__main__':
    main()
