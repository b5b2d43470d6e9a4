"""Write ``vil_official_options.pt``: outputs of the official Vision-LSTM code for its constructor options.

    python tests/data/vil_official/generate_options.py OFFICIAL_ROOT [--out vil_official_options.pt]

``OFFICIAL_ROOT`` is a checkout of github.com/NX-AI/vision-lstm (commit in ``OFFICIAL_COMMIT``) holding the
``vision_lstm`` package; only the package is imported (it needs torch, einops and numpy). The official code is never
copied into this repository. Every case builds an official model (``VisionLSTM2`` or the v1 ``VisionLSTM``), perturbs
its weights, and records what the official model computes after the official ``load_state_dict`` of those weights;
see README_options.md for the cases and the format (that of ``vil_official_parity.pt`` plus a few keys).
"""
import argparse
import inspect
import sys
from pathlib import Path

import torch

OFFICIAL_COMMIT = '381ba95c95c901a2ebc8aa6eabc13e34078e0e29'
V2 = dict(dim=16, depth=2, patch_size=8, input_shape=(3, 32, 32), output_shape=(10, ))
V1 = dict(dim=16, depth=3, patch_size=8, input_shape=(3, 32, 32), output_shape=(10, ))
LEGACY = dict(legacy_norm=True)
FEATURES = dict(mode='features', output_shape=None)

# name: (official class, kind, kwargs, seed, input (H, W), extras)
CASES = {
    'v2_cls_nolegacy': ('VisionLSTM2', 'classifier', dict(V2), 10, (32, 32), {'init'}),
    'v2_cls_avg_nobias_nonsquare': ('VisionLSTM2', 'classifier',
                                    dict(V2, **LEGACY, pooling='bilateral_avg', proj_bias=False, norm_bias=False),
                                    11, (32, 48), set()),
    'v2_cls_causal1d': ('VisionLSTM2', 'classifier', dict(V2, **LEGACY, conv_kind='causal1d'), 12, (32, 32), set()),
    'v2_cls_kernel5_ignored': ('VisionLSTM2', 'classifier', dict(V2, **LEGACY, conv_kernel_size=5), 13, (32, 32),
                               set()),
    'v2_cls_original_fixed_droppath': ('VisionLSTM2', 'classifier',
                                       dict(V2, **LEGACY, init_weights='original-fixed', drop_path_rate=0.2,
                                            drop_path_decay=True), 14, (32, 32), {'init'}),
    'v2_feat_image_nolegacy': ('VisionLSTM2', 'features_image', dict(V2, **FEATURES, pooling='to_image'), 15,
                               (48, 32), set()),
    'v2_feat_tokens_pooling_ignored': ('VisionLSTM2', 'features_tokens',
                                       dict(V2, **FEATURES, **LEGACY, pooling='bilateral_flatten'), 16, (32, 32),
                                       set()),
    'v2_cls_causal1d_stride4': ('VisionLSTM2', 'classifier', dict(V2, **LEGACY, conv_kind='causal1d', stride=4), 17,
                                (32, 32), set()),
    'v1_cls_droppath': ('VisionLSTM', 'classifier', dict(V1, **LEGACY, drop_path_rate=0.1, drop_path_decay=True),
                        20, (32, 32), set()),
    'v1_cls_nolegacy_nonsquare': ('VisionLSTM', 'classifier', dict(V1), 21, (48, 32), set()),
    'v1_features': ('VisionLSTM', 'features_tokens', dict(V1, **LEGACY, mode=None, pooling=None, output_shape=None),
                    22, (32, 32), set()),
    'v1_cls_stride4': ('VisionLSTM', 'classifier', dict(V1, **LEGACY, stride=4), 23, (32, 48), set()),
}


def complete_kwargs(cls, kwargs: dict) -> dict:
    """``kwargs`` with every other constructor argument at its default: the fixture records all options."""
    params = inspect.signature(cls.__init__).parameters
    return {name: kwargs.get(name, p.default) for name, p in params.items() if name != 'self'}


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its structured init (zeros, ones, linspace) so that each one matters."""
    gen = torch.Generator().manual_seed(seed + 123)
    with torch.no_grad():
        for param in model.parameters():
            param += (0.1 if param.dim() == 1 else 0.02) * torch.randn(param.shape, generator=gen)


def sub_blocks(model, official_class: str):
    if official_class == 'VisionLSTM':
        return list(model.blocks)
    return [sub for pair in model.blocks for sub in (pair.rowwise_from_top_left, pair.rowwise_from_bot_right)]


def run_case(classes: dict, name: str, spec: tuple) -> dict:
    official_class, kind, kwargs, seed, (height, width), extras = spec
    cls = classes[official_class]
    config = complete_kwargs(cls, kwargs)
    torch.manual_seed(seed)
    model = cls(**config)
    init_state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(model, seed)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}

    # The model that ran: built for the input's grid and loaded through the official load_state_dict, which
    # interpolates the position embedding and, in VisionLSTM2's feature mode, resets legacy_norm to 1 / 0.
    eval_config = dict(config, input_shape=(3, height, width))
    runner = cls(**eval_config)
    if config['mode'] == 'features' and not config['legacy_norm']:
        # The official load_state_dict raises KeyError here (it copies a legacy_norm the model does not have):
        # interpolate as it does, with its own function, and load with the plain nn.Module method.
        from vision_lstm.vision_lstm_util import interpolate_sincos
        state = dict(state_dict, **{'pos_embed.embed': interpolate_sincos(state_dict['pos_embed.embed'],
                                                                          runner.pos_embed.seqlens)})
        torch.nn.Module.load_state_dict(runner, state)
    else:
        runner.load_state_dict(dict(state_dict))
    runner.eval()
    blocks, outputs = sub_blocks(runner, official_class), {}
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda m, i, o, index=index: outputs.__setitem__(index, o))
    final_norm = runner.legacy_norm if official_class == 'VisionLSTM' else runner.norm
    if official_class == 'VisionLSTM2' or config['legacy_norm']:
        final_norm.register_forward_hook(lambda m, i, o: outputs.__setitem__('final_norm', o))
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed + 777))
    with torch.no_grad():
        expected = runner(x)
    case = dict(kind=kind, official_class=official_class, config=config, eval_config=eval_config,
                weights_note=f'torch.manual_seed({seed}); official init; every parameter += 0.1 (1-D) or 0.02 '
                             f'(else) * randn, generator seed {seed + 123}',
                state_dict=state_dict, input=x, expected=expected, expected_note=NOTES[kind],
                block_outputs=[outputs[i] for i in range(len(blocks))],
                drop_path_rates=[float(block.drop_path.drop_prob) for block in blocks])
    if 'final_norm' in outputs:
        case['final_norm_output'] = outputs['final_norm']
    if 'init' in extras:
        case['init_state_dict'] = init_state_dict
    return case


NOTES = {
    'classifier': 'logits of the official model (eval mode) built with eval_config and loaded with state_dict '
                  'through its load_state_dict (bicubic pos_embed interpolation to the input grid)',
    'features_tokens': 'official feature-mode output (B, N, D), row-major tokens, model built with eval_config and '
                       'loaded through its load_state_dict (VisionLSTM2 resets legacy_norm to weight 1, bias 0)',
    'features_image': 'official feature-mode output (B, D, h, w), model built with eval_config and loaded through '
                      'its load_state_dict',
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('official_root', help='checkout of NX-AI/vision-lstm (holds vision_lstm/)')
    parser.add_argument('--out', default=str(Path(__file__).with_name('vil_official_options.pt')))
    args = parser.parse_args()
    sys.path.insert(0, args.official_root)
    from vision_lstm.vision_lstm import VisionLSTM
    from vision_lstm.vision_lstm2 import VisionLSTM2

    torch.set_num_threads(1)
    classes = dict(VisionLSTM=VisionLSTM, VisionLSTM2=VisionLSTM2)
    fixture = dict(format='vil-parity-v1', official_commit=OFFICIAL_COMMIT,
                   official_class='vision_lstm.vision_lstm2.VisionLSTM2', torch_version=str(torch.__version__),
                   dtype='float32', device='cpu', cases={name: run_case(classes, name, spec)
                                                         for name, spec in CASES.items()})
    torch.save(fixture, args.out)
    print(f'{args.out}: {len(fixture["cases"])} cases')


if __name__ == '__main__':
    main()
