"""Helpers for tests that need the official ViL checkpoint layouts."""


def _released_block_key(index: int, rest: str) -> str:
    if rest.startswith('norm.'):
        rest = 'xlstm_norm.' + rest[len('norm.'):]
    else:
        rest = 'xlstm.' + rest[len('layer.'):]
    return f'xlstm.blocks.{index}.{rest}'


def official_to_released(official: dict, v1: bool = False) -> dict:
    """Inverse of the hub's renaming (vil_spec §5, tests/data/spec_excerpts.md): a released-format (.th,
    training-code names) state dict.

    ``v1`` inverts ``preprocess='v1'`` (``VisionLSTM`` keys) instead of ``'v2'`` (``VisionLSTM2`` keys).
    """
    final_norm, plain_norm = ('legacy_norm', 'norm') if v1 else ('norm', 'legacy_norm')
    out = {}
    for key, value in official.items():
        parts = key.split('.')
        if parts[0] == 'blocks' and v1:
            key = _released_block_key(int(parts[1]), '.'.join(parts[2:]))
        elif parts[0] == 'blocks':
            index = 2 * int(parts[1]) + (parts[2] == 'rowwise_from_bot_right')
            key = _released_block_key(index, '.'.join(parts[3:]).replace('layer.conv.', 'layer.conv1d.', 1))
        elif parts[0] == final_norm:
            key = 'xlstm.post_blocks_norm.' + parts[1]
        elif parts[0] == plain_norm:
            key = 'head.0.' + parts[1]
        elif parts[0] == 'head':
            key = 'head.1.' + parts[1]
        out[key] = value
    return out


def official_layer_decay_scale(name: str, rate: float, num_blocks: int = 24) -> float:
    """lr scale of a segmentor parameter in the official ViL UperNet recipe (tests/data/spec_excerpts.md, §7):
    layer-wise lr decay with ``group_two_blocks``, so each pair of mLSTM blocks is one layer. With P block pairs,
    patch and position embedding get rate^(P + 1), pair j (blocks 2j, 2j + 1) rate^(P - j), neck and heads 1."""
    pairs = num_blocks // 2
    if name.startswith(('backbone.patch_embed', 'backbone.pos_embed')):
        return rate**(pairs + 1)
    if name.startswith('backbone.layers.'):
        return rate**(pairs - int(name.split('.')[2]) // 2)
    assert name.startswith(('neck.', 'decode_head.', 'auxiliary_head.')), name
    return 1.0
