# The official ViL UperNet fine-tuning schedule (vil_spec.md §7): 160k iterations of AdamW with layer-wise lr decay,
# 1500 linear warm-up iterations, then cosine decay. It is used unchanged for the DeiT and Vim baselines.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(
        # Per backbone layer as reported by get_layer_depth: a ViL block pair or a ViT block; stem 0.65^13.
        layer_decay_rate=0.65,
        # No weight decay on normalisation layers, biases, other 1-D parameters and position / class tokens (also
        # whatever the backbone's no_weight_decay() lists).
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            'pos_embed': dict(decay_mult=0.0),
            'cls_token': dict(decay_mult=0.0)
        }))
# Cosine to 1e-6 at the base lr of 5e-4. eta_min_ratio (1e-6 / 5e-4) scales the floor of every layer's group with
# its layer-wise lr, so no group ends above its start, and it follows an overridden lr.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='CosineAnnealingLR', eta_min_ratio=2e-3, by_epoch=False, begin=1500, end=160000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# The hooks live here rather than in default_runtime.py: MMEngine forbids one key in two bases of a config, and the
# checkpoint interval belongs to the schedule.
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000, max_keep_ckpts=3, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
