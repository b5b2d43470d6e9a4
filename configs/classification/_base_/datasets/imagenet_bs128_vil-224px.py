# ImageNet-1K at 224px for ViL fine-tuning: the pre-training data recipe with every size set to 224.
_base_ = './imagenet_bs256_vil-192px.py'

resolution = 224
size_args = dict(RandomResizedCrop=dict(scale=resolution), ResizeEdge=dict(scale=resolution),
                 CenterCrop=dict(crop_size=resolution))
train_pipeline = [dict(t, **size_args.get(t.type, {})) for t in _base_.train_pipeline]
test_pipeline = [dict(t, **size_args.get(t.type, {})) for t in _base_.test_pipeline]

train_dataloader = dict(batch_size=128, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=128, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
