# Cityscapes (fine annotations, 19 classes) with MMSegmentation 1.2.2's 1024x1024 recipe
# (its configs/_base_/datasets/cityscapes.py and cityscapes_1024x1024.py). The layout is the official one plus the
# train-id labels that mmseg's tools/dataset_converters/cityscapes.py writes:
# leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png
# (train ids 0..18, 255 ignored: no reduce_zero_label). tools/generate_cityscapes.py writes a small synthetic stand-in.
_base_ = ['./segmentation_loaders.py']
dataset_type = 'CityscapesDataset'
data_root = 'data/cityscapes/'
crop_size = (1024, 1024)
# Frames are 2048x1024; RandomResize scales them by 0.5-2.0 around that size before the 1024x1024 crop.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
# Evaluation at full resolution (the leaf configs slide 1024x1024 windows over it); labels are loaded after the
# resize, so metrics are computed at the original resolution.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
# Two images per GPU, mmseg's Cityscapes batch: the configs are named 4xb2 (total 8, as mmseg's UperNet Cityscapes
# runs); on 8 GPUs pass --cfg-options train_dataloader.batch_size=1 to keep the total.
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
