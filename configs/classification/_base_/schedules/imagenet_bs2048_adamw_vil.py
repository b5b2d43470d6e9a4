# ViL pre-training schedule (vil_spec.md §4): AdamW, lr 1e-3 per 1024 images, wd 0.05 except norms, biases, other
# 1-D parameters and the position embedding, grad-norm clip 1.0, 5 linear warm-up epochs, cosine to 1e-6, bf16.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=1e-3 * 2048 / 1024, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=1.0),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={'backbone.pos_embed': dict(decay_mult=0.0)},
    ),
)

warmup_epochs = 5
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=warmup_epochs, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=warmup_epochs, convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=800, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# lr above is for 8 GPUs x 256 images; `--auto-scale-lr` rescales it linearly to another total batch size.
auto_scale_lr = dict(base_batch_size=2048)
