# ViL-B/16 + UperNet on ADE20K, the official recipe (vil_spec.md §7): raw outputs of mLSTM blocks 7, 11, 15, 23
# (no final norm), the position embedding resampled to the 32x32 grid of 512x512 inputs, drop path 0.1 rising
# linearly over depth.
_base_ = [
    '../_base_/models/upernet_isotropic-base.py', '../_base_/datasets/ade20k.py', '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_160k.py'
]
# Released ImageNet-1K weights: https://ml.jku.at/research/vision_lstm/download/vil2_base16_e400_in1k.th
# Override with --cfg-options model.backbone.init_cfg.checkpoint=PATH (model.backbone.init_cfg=None: from scratch).
checkpoint = 'pretrained/vil2_base16_e400_in1k.th'
model = dict(
    backbone=dict(
        type='ViL',
        arch='base',
        img_size=512,
        out_indices=(7, 11, 15, 23),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
