# ViL-B/16 ImageNet-1K pre-training at 192px, 400 epochs, batch 2048 (official log: 81.55 top-1 at 192px,
# 82.4 after the 224px fine-tuning in vil-b16_192px-pre_8xb128-5e_in1k-224px.py).
_base_ = [
    './_base_/models/vil-b16.py',
    './_base_/datasets/imagenet_bs256_vil-192px.py',
    './_base_/schedules/imagenet_bs2048_adamw_vil.py',
    './_base_/default_runtime.py',
]

model = dict(backbone=dict(img_size=192))
train_cfg = dict(max_epochs=400)
