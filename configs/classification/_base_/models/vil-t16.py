# ViL-T/16 ImageNet-1K classifier as the released vil2 models (vil_spec.md §2.7): final-normed first and last tokens,
# concatenated (2 x 192), then LayerNorm and a linear layer. Mixup 0.8 / CutMix 1.0, one of them per batch,
# with soft-target cross-entropy and no label smoothing, as the official recipe.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ViL',
        arch='tiny',
        img_size=224,
        patch_size=16,
        out_indices=(-1, ),
        out_type='pooled',
        final_norm=True,
        drop_path_rate=0.0,
        drop_path_decay=False,
    ),
    neck=None,
    head=dict(
        type='ViLClsHead',
        num_classes=1000,
        in_channels=2 * 192,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0, use_soft=True),
    ),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)
