# UperNet widths for small isotropic backbones (ViL-S, DeiT-S, Vim-S):
# features D=384, decoder and auxiliary head channels 384.
_base_ = ['./upernet_isotropic.py']
model = dict(
    neck=dict(embed_dim=384),
    decode_head=dict(in_channels=[384, 384, 384, 384], channels=384),
    auxiliary_head=dict(in_channels=384, channels=384))
