# ViL-S/16 + UperNet on Cityscapes at 1024x1024 crops (4096 tokens), where ViL's cost, linear in the tokens,
# matters: the backbone and optimizer of upernet_vil-s16_1xb16-160k_ade20k-512x512.py in MMSegmentation's Cityscapes
# recipe (19 classes, 80k iterations, 2 images on each of 4 GPUs, 1024x1024 windows with stride 768 over the
# full-resolution frames at test time). The position embedding is resampled to the 64x64 grid of 1024x1024 inputs.
_base_ = [
    '../_base_/models/upernet_isotropic-small.py', '../_base_/datasets/cityscapes_1024x1024.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py'
]
# Released ImageNet-1K weights: https://ml.jku.at/research/vision_lstm/download/vil2_small16_e400_in1k.th
# Override with --cfg-options model.backbone.init_cfg.checkpoint=PATH (model.backbone.init_cfg=None: from scratch).
checkpoint = 'pretrained/vil2_small16_e400_in1k.th'
crop_size = (1024, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        type='ViL',
        arch='small',
        img_size=1024,
        out_indices=(7, 11, 15, 23),
        drop_path_rate=0.05,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(num_classes=19),
    auxiliary_head=dict(num_classes=19),
    test_cfg=dict(crop_size=crop_size, stride=(768, 768)))
