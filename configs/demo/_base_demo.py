# The embedded demo (tools/demo.py): UperNet on a synthetic ADE20K (tools/generate_ade20k.py), trained from scratch
# on a CPU in minutes. Everything but the backbone is shared by vil_demo.py, deit_demo.py and vim_demo.py, so their
# difference in mIoU is the backbones' difference. It is the full-size recipe (configs/_base_) scaled down:
# 128x128 crops, width-64 features and decoder, 8 classes, a few hundred iterations, no pretrained weights.
_base_ = [
    '../_base_/models/upernet_isotropic.py', '../_base_/datasets/ade20k.py', '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_160k.py'
]
data_root = 'data/ade_demo/ADEChallengeData2016'
crop_size = (128, 128)
embed_dims = 64
max_iters = 160

# The generator draws ADE classes 1..8 (its default num_classes=8); the model predicts only those. Naming them here
# makes the dataset map labels to these 8 and stores their names and colours in the checkpoints.
metainfo = dict(
    classes=('wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed '),
    palette=[[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
             [140, 140, 140], [204, 5, 255]])
num_classes = 8

# The ADE20K pipeline at 1/4 of the scale. No photometric distortion: hue and brightness are class cues here.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# Data loading is cheap next to the model on a CPU; workers would only compete with it for the cores.
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

norm_cfg = dict(type='BN', requires_grad=True)  # single process on a CPU: plain BN instead of SyncBN
model = dict(
    data_preprocessor=dict(size=crop_size),
    neck=dict(embed_dim=embed_dims, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=[embed_dims] * 4, channels=embed_dims, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=embed_dims, channels=embed_dims // 2, num_classes=num_classes, norm_cfg=norm_cfg),
    test_cfg=dict(_delete_=True, mode='whole'))

# From scratch: a larger learning rate, a short warm-up and no layer-wise decay (there are no pretrained layers to
# protect). Validation and the checkpoint come once, at the end.
optim_wrapper = dict(optimizer=dict(lr=2e-3), paramwise_cfg=dict(layer_decay_rate=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-2, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
