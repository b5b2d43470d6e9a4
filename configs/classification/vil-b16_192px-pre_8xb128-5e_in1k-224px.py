# ViL-B/16 fine-tuning at 224px, 5 epochs with 1 warm-up epoch, batch 1024, from the last checkpoint of the 192px
# pre-training (the released vil2-base: 82.4 top-1). Loading resamples the position embedding to 14x14 (bicubic).
_base_ = [
    './_base_/models/vil-b16.py',
    './_base_/datasets/imagenet_bs128_vil-224px.py',
    './_base_/schedules/imagenet_bs1024_adamw_vil-ft.py',
    './_base_/default_runtime.py',
]

warmup_epochs = 1
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=warmup_epochs, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=warmup_epochs, convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=5)
load_from = 'work_dirs/vil-b16_8xb256-400e_in1k-192px/epoch_400.pth'
