# The tiny ViL config for data-parallel training on CPU (torchrun + gloo), made independent of how the global batch
# is split over processes: 1, 2 and 4 processes at the same global batch must compute the same losses and weights
# (tests/test_distributed.py). Hooks save every rank's weights, losses and images.
# * GroupNorm instead of SyncBN: SyncBN needs GPUs and becomes per-process BN on CPU, whose statistics depend on the
#   split (with one image per process the decoder's 1x1 pooled map could not be batch-normalised at all);
# * no random transforms: MMSeg's transforms draw from the process's global RNG, so an image would be augmented
#   differently depending on which process loads it and when (the generated images already have the crop size);
# * cross-entropy averaged over all pixels (avg_non_ignore=False): every process then divides by the same pixel
#   count, and DDP's mean of the per-process gradients is the gradient of the global-batch mean (with the recipe's
#   avg_non_ignore=True each process divides by its own count of labelled pixels);
# * no dropout or drop path (as in the base configs);
# * a constant lr of 5e-4 (no warm-up), so that the few steps move the weights visibly, and gradient clipping at a
#   norm never reached, only to have MMEngine log the global gradient norm (AdamW's steps do not show its scale).
_base_ = ['./upernet_vil-tiny_synthetic-64x64.py']
# rank_state_hook.py lies next to this file; the test puts tests/configs on PYTHONPATH.
custom_imports = dict(imports=['mmseg_vil', 'rank_state_hook'], allow_failed_imports=False)
custom_hooks = [dict(type='SaveRankStateHook'), dict(type='SaveRankIterationsHook')]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
norm_cfg = dict(type='GN', num_groups=4, requires_grad=True)
loss_decode = dict(type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=False)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg, loss_decode=dict(loss_decode, loss_weight=1.0)),
    auxiliary_head=dict(norm_cfg=norm_cfg, loss_decode=dict(loss_decode, loss_weight=0.4)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))  # the global batch; the test divides it
optim_wrapper = dict(clip_grad=dict(max_norm=1e9, norm_type=2))
param_scheduler = []
train_cfg = dict(max_iters=4, val_interval=100, val_begin=100)
default_hooks = dict(checkpoint=dict(interval=100, save_last=False))
