# UperNet widths for tiny isotropic backbones (ViL-T, DeiT-T, Vim-T):
# features D=192, decoder and auxiliary head channels 192.
_base_ = ['./upernet_isotropic.py']
model = dict(
    neck=dict(embed_dim=192),
    decode_head=dict(in_channels=[192, 192, 192, 192], channels=192),
    auxiliary_head=dict(in_channels=192, channels=192))
