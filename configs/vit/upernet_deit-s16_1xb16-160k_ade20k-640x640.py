# DeiT-S/16 baseline for ViL-S on ADE20K at 640x640 crops: upernet_deit-s16_1xb16-160k_ade20k-512x512.py in the
# recipe of ../vil/upernet_vil-s16_1xb16-160k_ade20k-640x640.py, which differs only in the backbone. The position
# embedding is resampled to the 40x40 grid of 640x640 inputs when the checkpoint is loaded.
_base_ = [
    '../_base_/models/upernet_isotropic-small.py', '../_base_/datasets/ade20k_640x640.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
# timm's DeiT weights, https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth,
# converted to MMSegmentation keys by mmseg's tools/model_converters/vit2mmseg.py (in site-packages/mmseg/.mim).
checkpoint = 'pretrained/deit_small_patch16_224-cd65a155_mmseg.pth'
crop_size = (640, 640)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        type='VisionTransformer',
        img_size=(640, 640),
        embed_dims=384,
        num_heads=6,
        out_indices=(3, 5, 7, 11),
        drop_path_rate=0.05,
        norm_cfg=dict(type='LN', eps=1e-6),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    test_cfg=dict(crop_size=crop_size, stride=(426, 426)))
