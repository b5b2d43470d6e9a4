# ViL fine-tuning schedule at 224px (vil_spec.md §4): the pre-training optimizer with lr 1e-5 per 1024 images and,
# as in the official fine-tuning runs, no gradient clipping; 20 epochs with 5 warm-up epochs.
_base_ = './imagenet_bs2048_adamw_vil.py'

optim_wrapper = dict(optimizer=dict(lr=1e-5 * 1024 / 1024), clip_grad=None)
train_cfg = dict(max_epochs=20)
auto_scale_lr = dict(base_batch_size=1024)
