# ViL-T/16 ImageNet-1K pre-training at 192px, 800 epochs, batch 2048 (released vil2-tiny: 77.05 top-1 at 192px,
# 78.3 after the 224px fine-tuning in vil-t16_192px-pre_8xb128-20e_in1k-224px.py).
_base_ = [
    './_base_/models/vil-t16.py',
    './_base_/datasets/imagenet_bs256_vil-192px.py',
    './_base_/schedules/imagenet_bs2048_adamw_vil.py',
    './_base_/default_runtime.py',
]

model = dict(backbone=dict(img_size=192))
