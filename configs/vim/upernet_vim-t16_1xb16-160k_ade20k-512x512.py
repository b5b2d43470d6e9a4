# Vim-T/16 baseline for ViL-T: the Vim backbone in the ViL recipe (same neck, heads, data, schedule and drop
# path); features of layers 5, 11, 17, 23 of 24 without the class token, like Vim's own segmentation models.
_base_ = [
    '../_base_/models/upernet_isotropic-tiny.py', '../_base_/datasets/ade20k.py', '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_160k.py'
]
# Released ImageNet-1K weights: huggingface.co/hustvl/Vim-tiny-midclstok, file vim_t_midclstok_76p1acc.pth
# (official keys load as is).
checkpoint = 'pretrained/vim_t_midclstok_76p1acc.pth'
model = dict(
    backbone=dict(
        type='Vim',
        arch='tiny',
        img_size=512,
        out_indices=(5, 11, 17, 23),
        with_cls_token=False,
        feature_source='mixer',  # as in Vim's own Vim-T segmentation run
        drop_path_rate=0.0,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
# Vim reports one depth per block (24) where ViL reports one per block pair (12): a per-block rate of sqrt(0.65)
# gives both the same decay over the whole depth (stem at about 0.65^13).
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.65**0.5))
