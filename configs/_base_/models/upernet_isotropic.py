# UperNet on an isotropic backbone (one 1/16-stride feature width D at every depth), the ADE20K model of the ViL
# paper. The backbone returns four 1/16 maps; Feature2Pyramid turns them into the 1/4, 1/8, 1/16, 1/32 pyramid that
# UperNet expects (deconv-BN-GELU-deconv, deconv, identity, max-pool: the official ViL neck, also BEiT's and Vim's).
# Widths come from upernet_isotropic-{tiny,small,base}.py, the backbone from each leaf config.
norm_cfg = dict(type='SyncBN', requires_grad=True)  # MMEngine turns SyncBN into BN when not distributed
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512))  # pad training batches to the dataset's crop size
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(),  # set by the leaf config
    neck=dict(type='Feature2Pyramid', rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    # The official decoder has no dropout; cross-entropy is averaged over labelled pixels (PyTorch's ignore_index).
    decode_head=dict(
        type='UPerHead',
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        dropout_ratio=0.0,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=True, loss_weight=1.0)),
    # Auxiliary FCN on the third (1/16) level, weight 0.4.
    auxiliary_head=dict(
        type='FCNHead',
        in_index=2,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=True, loss_weight=0.4)),
    train_cfg=dict(),
    # Sliding 512 windows with stride 341, as ViL, Vim and BEiT evaluate.
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
