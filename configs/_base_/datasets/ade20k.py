# ADE20K (SceneParse150) with MMSegmentation's standard 512x512 recipe, shared by every segmentation config.
# Normalisation and padding to the crop size happen in the model's SegDataPreProcessor, not here.
_base_ = ['./segmentation_loaders.py']
dataset_type = 'ADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
crop_size = (512, 512)
# Label 0 ("other") becomes 255 and is ignored; classes 1..150 become 0..149.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
# Evaluation resizes the short side to 512 (long side at most 2048); the label map is loaded after the resize, so
# metrics are computed at the original resolution.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# Batch 16 is the recipe's total batch. The config names say 1xb16 (one GPU, as the official ViL runs); on 8 GPUs
# pass --cfg-options train_dataloader.batch_size=2 to keep the total, and SyncBN keeps batch statistics over all 16.
train_dataloader = dict(
    batch_size=16,
    num_workers=8,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
