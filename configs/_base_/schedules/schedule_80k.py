# The ViL fine-tuning recipe of schedule_160k.py (AdamW, lr 5e-4, layer-wise lr decay 0.65, 1500 linear warm-up
# iterations, cosine decay to 1e-6) over MMSegmentation's 80k-iteration schedule, with its validation and checkpoint
# interval of 8000 iterations.
_base_ = ['./schedule_160k.py']
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='CosineAnnealingLR', eta_min_ratio=2e-3, by_epoch=False, begin=1500, end=80000),
]
train_cfg = dict(max_iters=80000, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
