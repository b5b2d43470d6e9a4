# Demo ViL: 12 mLSTM blocks (6 pairs) of width 64 on 16x16 patches, features of blocks 3, 5, 7, 11: ViL-T/16
# (24 blocks, features 7, 11, 15, 23) at half depth and a third of the width. See _base_demo.py.
_base_ = ['./_base_demo.py']
model = dict(
    backbone=dict(
        type='ViL',
        arch=dict(embed_dims={{_base_.embed_dims}}, num_layers=12),
        img_size={{_base_.crop_size}},
        patch_size=16,
        out_indices=(3, 5, 7, 11),
        drop_path_rate=0.0))
