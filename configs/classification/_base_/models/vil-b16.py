# ViL-B/16: ViL-T/16 at width 768, drop-path 0.2 on every block (vil_spec.md §4).
_base_ = './vil-t16.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.2), head=dict(in_channels=2 * 768))
