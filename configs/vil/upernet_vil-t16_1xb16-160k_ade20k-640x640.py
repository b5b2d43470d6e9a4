# ViL-T/16 + UperNet on ADE20K at 640x640 crops (1600 tokens): upernet_vil-t16_1xb16-160k_ade20k-512x512.py with
# MMSegmentation's 640x640 ADE20K recipe (scale (2560, 640) in training and test, 640x640 windows with stride 426 at
# test time). The position embedding is resampled to the 40x40 grid of 640x640 inputs.
_base_ = [
    '../_base_/models/upernet_isotropic-tiny.py', '../_base_/datasets/ade20k_640x640.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
# Released ImageNet-1K weights: https://ml.jku.at/research/vision_lstm/download/vil2_tiny16_e800_in1k.th
# Override with --cfg-options model.backbone.init_cfg.checkpoint=PATH (model.backbone.init_cfg=None: from scratch).
checkpoint = 'pretrained/vil2_tiny16_e800_in1k.th'
crop_size = (640, 640)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        type='ViL',
        arch='tiny',
        img_size=640,
        out_indices=(7, 11, 15, 23),
        drop_path_rate=0.0,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    test_cfg=dict(crop_size=crop_size, stride=(426, 426)))
