# The tiny ViL config for data-parallel training on CPU (torchrun + gloo), with a hook that saves every rank's
# weights. A constant lr of 5e-4 (no warm-up) makes the few steps move the weights visibly.
_base_ = ['./upernet_vil-tiny_synthetic-64x64.py']
# rank_state_hook.py lies next to this file; the test puts tests/configs on PYTHONPATH.
custom_imports = dict(imports=['mmseg_vil', 'rank_state_hook'], allow_failed_imports=False)
custom_hooks = [dict(type='SaveRankStateHook')]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
param_scheduler = []
train_cfg = dict(max_iters=3, val_interval=100, val_begin=100)
default_hooks = dict(checkpoint=dict(interval=100, save_last=False))
