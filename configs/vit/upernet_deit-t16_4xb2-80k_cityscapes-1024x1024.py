# DeiT-T/16 baseline for ViL-T on Cityscapes at 1024x1024 crops (4096 tokens, where global attention's quadratic
# cost shows): the backbone of upernet_deit-t16_1xb16-160k_ade20k-512x512.py in the recipe of
# ../vil/upernet_vil-t16_4xb2-80k_cityscapes-1024x1024.py, which differs only in the backbone. The position
# embedding is resampled to the 64x64 grid of 1024x1024 inputs when the checkpoint is loaded.
_base_ = [
    '../_base_/models/upernet_isotropic-tiny.py', '../_base_/datasets/cityscapes_1024x1024.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py'
]
# timm's DeiT weights, https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth,
# converted to MMSegmentation keys by mmseg's tools/model_converters/vit2mmseg.py (in site-packages/mmseg/.mim).
checkpoint = 'pretrained/deit_tiny_patch16_224-a1311bcf_mmseg.pth'
crop_size = (1024, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        type='VisionTransformer',
        img_size=(1024, 1024),
        embed_dims=192,
        num_heads=3,
        out_indices=(3, 5, 7, 11),
        drop_path_rate=0.0,
        norm_cfg=dict(type='LN', eps=1e-6),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(num_classes=19),
    auxiliary_head=dict(num_classes=19),
    test_cfg=dict(crop_size=crop_size, stride=(768, 768)))
