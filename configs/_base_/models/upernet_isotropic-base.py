# UperNet widths for base isotropic backbones (ViL-B, DeiT-B):
# features D=768, decoder and auxiliary head channels 384.
_base_ = ['./upernet_isotropic.py']
model = dict(
    neck=dict(embed_dim=768),
    decode_head=dict(in_channels=[768, 768, 768, 768], channels=384),
    auxiliary_head=dict(in_channels=768, channels=384))
