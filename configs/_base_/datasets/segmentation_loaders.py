# What the dataset bases (ade20k.py, cityscapes_1024x1024.py) share, as in MMSegmentation: an endless shuffled
# training stream, evaluation one image at a time in order, mIoU, and multi-scale + flip evaluation for
# tools/test.py --tta (wrapped by default_runtime's tta_model). Each dataset base adds its dataset, pipelines and batch.
tta_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in tta_ratios],
            [dict(type='RandomFlip', prob=0.0, direction='horizontal'),
             dict(type='RandomFlip', prob=1.0, direction='horizontal')],
            [dict(type='LoadAnnotations')],  # reduce_zero_label as the dataset sets it
            [dict(type='PackSegInputs')],
        ]),
]
train_dataloader = dict(persistent_workers=True, sampler=dict(type='InfiniteSampler', shuffle=True))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True, sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
