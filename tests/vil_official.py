"""Helpers for tests that need the official ViL checkpoint layouts."""


def official_to_released(official: dict) -> dict:
    """Inverse of the hub's renaming, written from vil_spec.md §5 to produce a released-format (.th) state dict."""
    out = {}
    for key, value in official.items():
        parts = key.split('.')
        if parts[0] == 'blocks':
            index = 2 * int(parts[1]) + (parts[2] == 'rowwise_from_bot_right')
            rest = '.'.join(parts[3:]).replace('norm.', 'xlstm_norm.', 1) if parts[3] == 'norm' else \
                '.'.join(parts[3:]).replace('layer.', 'xlstm.', 1).replace('.conv.', '.conv1d.')
            key = f'xlstm.blocks.{index}.{rest}'
        elif parts[0] == 'norm':
            key = 'xlstm.post_blocks_norm.' + parts[1]
        elif parts[0] == 'legacy_norm':
            key = 'head.0.' + parts[1]
        elif parts[0] == 'head':
            key = 'head.1.' + parts[1]
        out[key] = value
    return out
