# A CPU-sized variant of the ViL-T ADE20K config for the end-to-end tests: the same segmentor type, data layout,
# optimizer, schedule shape and hooks, with a 4-block ViL of width 32, 64x64 crops and a few iterations.
# The test points data_root at a generated ADE20K-layout folder via --cfg-options.
_base_ = ['../../configs/vil/upernet_vil-t16_1xb16-160k_ade20k-512x512.py']

crop_size = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(128, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=32, num_layers=4), img_size=64, out_indices=(0, 1, 2, 3), init_cfg=None),
    neck=dict(embed_dim=32),
    decode_head=dict(in_channels=[32, 32, 32, 32], channels=16),
    auxiliary_head=dict(in_channels=32, channels=16),
    test_cfg=dict(crop_size=crop_size, stride=(43, 43)))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2, max_keep_ckpts=-1))
randomness = dict(seed=0)
