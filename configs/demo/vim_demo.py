# Demo Vim baseline: 12 bidirectional Mamba layers of width 64 on 16x16 patches, features (mixer outputs, no class
# token) of layers 2, 5, 8, 11: Vim-T/16 (24 layers, features 5, 11, 17, 23) scaled like the demo ViL.
# See _base_demo.py.
_base_ = ['./_base_demo.py']
model = dict(
    backbone=dict(
        type='Vim',
        arch=dict(embed_dims={{_base_.embed_dims}}, num_layers=12),
        img_size={{_base_.crop_size}},
        patch_size=16,
        out_indices=(2, 5, 8, 11),
        with_cls_token=False,
        feature_source='mixer',
        drop_path_rate=0.0))
