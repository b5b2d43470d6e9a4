# ViL-S/16 fine-tuning at 224px, 20 epochs, batch 1024, from the last checkpoint of the 192px pre-training
# (the released vil2-small: 81.5 top-1). Loading resamples the 12x12 position embedding to 14x14 (bicubic).
_base_ = [
    './_base_/models/vil-s16.py',
    './_base_/datasets/imagenet_bs128_vil-224px.py',
    './_base_/schedules/imagenet_bs1024_adamw_vil-ft.py',
    './_base_/default_runtime.py',
]

load_from = 'work_dirs/vil-s16_8xb256-400e_in1k-192px/epoch_400.pth'
