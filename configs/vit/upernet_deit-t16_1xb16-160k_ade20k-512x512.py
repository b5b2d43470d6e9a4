# DeiT-T/16 baseline for ViL-T: MMSegmentation's VisionTransformer in the ViL recipe (same neck, heads, data,
# schedule and drop path); features of blocks 3, 5, 7, 11 of 12, the depths the official DeiT baselines use.
_base_ = [
    '../_base_/models/upernet_isotropic-tiny.py', '../_base_/datasets/ade20k.py', '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_160k.py'
]
# timm's DeiT weights, https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth,
# converted to MMSegmentation keys by mmseg's tools/model_converters/vit2mmseg.py (in site-packages/mmseg/.mim).
checkpoint = 'pretrained/deit_tiny_patch16_224-a1311bcf_mmseg.pth'
model = dict(
    backbone=dict(
        type='VisionTransformer',
        img_size=(512, 512),
        embed_dims=192,
        num_heads=3,
        out_indices=(3, 5, 7, 11),
        drop_path_rate=0.0,
        norm_cfg=dict(type='LN', eps=1e-6),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
