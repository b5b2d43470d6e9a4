# Runtime shared by every segmentation config: MMSegmentation registries, with this package's models and optimizer
# constructor registered when the config is loaded (so stock MMSegmentation tools work as well as ours).
default_scope = 'mmseg'
custom_imports = dict(imports=['mmseg_vil'], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # CPU multi-process runs (torchrun + tools/train.py --launcher pytorch) need backend='gloo'.
    dist_cfg=dict(backend='nccl'),
)
# Every parameter of the shipped models gets a gradient in every step (tests/test_distributed.py), so DDP need not
# search the graph for unused ones; a model that leaves some out needs True.
find_unused_parameters = False
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
tta_model = dict(type='SegTTAModel')
