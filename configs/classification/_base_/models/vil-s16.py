# ViL-S/16: ViL-T/16 at width 384, drop-path 0.05 on every block (vil_spec.md §4).
_base_ = './vil-t16.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.05), head=dict(in_channels=2 * 384))
