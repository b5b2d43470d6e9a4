"""The official Vision-LSTM constructors' options as :class:`~.vil.ViL` + ``ViLClsHead`` configs.

Users bring models trained with the official code (``vision_lstm.VisionLSTM2`` or the v1 ``VisionLSTM``), whose
constructor kwargs (``dim``, ``depth``, ``pooling``, ``legacy_norm``, ...) say how the model computes.
:func:`vil_config_from_official` turns them into the equivalent configs of this package, which compute the same
function from the same state dict (loaded through :func:`.vil_checkpoint.convert_vil_state_dict`); an option or
value this package does not reproduce raises a ``ValueError`` naming it and the supported values.
"""
import warnings
from typing import Any, Dict, Mapping, Optional

from ..layers.mixer_ops.reference import CONV_KINDS
from .vil import INIT_SCHEMES, V1_MIXER

OFFICIAL_CLASSES = ('VisionLSTM2', 'VisionLSTM')
# Constructor defaults of the official classes (vision_lstm2.py / vision_lstm.py at the commit of vil_spec.md).
VISION_LSTM2_DEFAULTS = dict(dim=192, input_shape=(3, 224, 224), patch_size=16, depth=12, output_shape=(1000, ),
                             mode='classifier', pooling='bilateral_flatten', drop_path_rate=0.0,
                             drop_path_decay=False, stride=None, legacy_norm=False, conv_kind='2d',
                             conv_kernel_size=3, proj_bias=True, norm_bias=True, init_weights='original')
VISION_LSTM_DEFAULTS = dict(dim=192, input_shape=(3, 224, 224), patch_size=16, depth=24, output_shape=(1000, ),
                            mode='classifier', pooling='bilateral_avg', drop_path_rate=0.0, stride=None,
                            alternation='bidirectional', drop_path_decay=False, legacy_norm=False)
CLASSIFIER_POOLINGS = {'bilateral_flatten': 'pooled', 'bilateral_avg': 'avg_pooled'}
FEATURE_POOLINGS = {None: 'raw', 'to_image': 'featmap'}


def _refuse(option: str, value: Any, supported: str) -> ValueError:
    return ValueError(f'official option {option}={value!r} is not supported; supported: {supported}')


def _square(option: str, value: Any) -> Optional[int]:
    """An int from an official int-or-tuple option (patch_size, stride); non-square values are refused."""
    if value is None or isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise _refuse(option, value, 'an int or a pair of equal ints (square patches)')


def _resolve(kwargs: Mapping[str, Any], defaults: Dict[str, Any], official_class: str) -> Dict[str, Any]:
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f'{official_class} has no option(s) {unknown}; its options are {sorted(defaults)}')
    options = {**defaults, **kwargs}
    if len(options['input_shape']) != 3:
        raise _refuse('input_shape', options['input_shape'], '(channels, height, width) of 2-D images')
    return options


def _backbone(options: Dict[str, Any], arch: dict, **kwargs) -> dict:
    return dict(type='ViL', arch=arch, img_size=tuple(options['input_shape'][1:]),
                in_channels=options['input_shape'][0], patch_size=_square('patch_size', options['patch_size']),
                patch_stride=_square('stride', options['stride']), out_indices=(-1, ),
                drop_path_rate=options['drop_path_rate'], **kwargs)


def _num_classes(options: Dict[str, Any]) -> int:
    shape = options['output_shape']
    if shape is None or len(shape) != 1:
        raise _refuse('output_shape', shape, '(num_classes,) for mode="classifier"')
    return int(shape[0])


def _vision_lstm2(options: Dict[str, Any]) -> Dict[str, Optional[dict]]:
    if options['conv_kind'] not in CONV_KINDS:
        raise _refuse('conv_kind', options['conv_kind'], ', '.join(CONV_KINDS))
    if options['init_weights'] not in INIT_SCHEMES:
        raise _refuse('init_weights', options['init_weights'], ', '.join(INIT_SCHEMES))
    if options['conv_kernel_size'] != 3:
        warnings.warn(f'VisionLSTM2 ignores conv_kernel_size={options["conv_kernel_size"]}: its blocks are built '
                      'with their default kernel size 3, and so is this model')
    dim = options['dim']
    arch = dict(embed_dims=dim, num_layers=2 * options['depth'], conv_kind=options['conv_kind'], conv_kernel_size=3,
                proj_bias=options['proj_bias'], norm_bias=options['norm_bias'])
    common = dict(final_norm=True, final_norm_eps=1e-6, init_scheme=options['init_weights'],
                  drop_path_decay='pairs' if options['drop_path_decay'] else 'none')
    pooling, mode = options['pooling'], options['mode']
    if mode == 'classifier':
        if pooling not in CLASSIFIER_POOLINGS:
            raise _refuse('pooling', pooling, f'{sorted(CLASSIFIER_POOLINGS)} with mode="classifier" (other '
                          'poolings classify every token)')
        head = dict(type='ViLClsHead', num_classes=_num_classes(options),
                    in_channels=2 * dim if pooling == 'bilateral_flatten' else dim,
                    with_norm=options['legacy_norm'], norm_eps=1e-5)
        return dict(backbone=_backbone(options, arch, out_type=CLASSIFIER_POOLINGS[pooling], **common), head=head)
    if mode == 'features':
        if pooling not in FEATURE_POOLINGS:  # the official model warns and pools nothing
            warnings.warn(f'VisionLSTM2 ignores pooling={pooling!r} in mode="features" (tokens are returned)')
            pooling = None
        return dict(backbone=_backbone(options, arch, out_type=FEATURE_POOLINGS[pooling],
                                       out_norm=options['legacy_norm'], out_norm_eps=1e-5, **common), head=None)
    raise _refuse('mode', mode, '"classifier", "features"')


def _vision_lstm(options: Dict[str, Any]) -> Dict[str, Optional[dict]]:
    if options['alternation'] != 'bidirectional':
        raise _refuse('alternation', options['alternation'], '"bidirectional"')
    dim = options['dim']
    arch = dict(embed_dims=dim, num_layers=options['depth'], **V1_MIXER)
    # v1's residual-weight `legacy_norm` (eps 1e-5, no bias) is the norm after the blocks.
    common = dict(final_norm=options['legacy_norm'], final_norm_eps=1e-5,
                  drop_path_decay='blocks' if options['drop_path_decay'] else 'none')
    mode, pooling = options['mode'], options['pooling']
    if mode == 'classifier':
        if pooling != 'bilateral_avg':
            raise _refuse('pooling', pooling, '"bilateral_avg" with mode="classifier" (None classifies every token)')
        head = dict(type='ViLClsHead', num_classes=_num_classes(options), in_channels=dim, with_norm=True,
                    norm_eps=1e-6)
        return dict(backbone=_backbone(options, arch, out_type='avg_pooled', **common), head=head)
    if mode is None:
        if pooling is not None:
            raise _refuse('pooling', pooling, 'None with mode=None (the feature extractor)')
        return dict(backbone=_backbone(options, arch, out_type='raw', out_norm=True, out_norm_eps=1e-6, **common),
                    head=None)
    raise _refuse('mode', mode, '"classifier", None')


def vil_config_from_official(kwargs: Mapping[str, Any],
                             official_class: str = 'VisionLSTM2') -> Dict[str, Optional[dict]]:
    """``dict(backbone=ViL config, head=ViLClsHead config or None)`` computing ``official_class(**kwargs)``.

    The backbone outputs what the official model feeds its classifier (``head`` set) or, in the official feature
    mode (``head`` None), the official output itself, from the last block (``out_indices=(-1,)``; change it for
    multi-level features). ``official_class`` is ``'VisionLSTM2'`` or ``'VisionLSTM'`` (v1).
    """
    if official_class == 'VisionLSTM2':
        return _vision_lstm2(_resolve(kwargs, VISION_LSTM2_DEFAULTS, official_class))
    if official_class == 'VisionLSTM':
        return _vision_lstm(_resolve(kwargs, VISION_LSTM_DEFAULTS, official_class))
    raise ValueError(f'official_class={official_class!r} is not supported; choose one of {OFFICIAL_CLASSES}')
