# Demo DeiT baseline: MMSegmentation's VisionTransformer with 6 blocks of width 64 (2 heads) on 16x16 patches,
# features of blocks 1, 2, 3, 5: DeiT-T/16 (12 blocks, features 3, 5, 7, 11) scaled like the demo ViL, whose
# 12 mLSTM blocks match these 6 transformer blocks as ViL-T's 24 match DeiT-T's 12. See _base_demo.py.
_base_ = ['./_base_demo.py']
model = dict(
    backbone=dict(
        type='VisionTransformer',
        img_size={{_base_.crop_size}},
        patch_size=16,
        embed_dims={{_base_.embed_dims}},
        num_layers=6,
        num_heads=2,
        out_indices=(1, 2, 3, 5),
        drop_path_rate=0.0,
        norm_cfg=dict(type='LN', eps=1e-6)))
