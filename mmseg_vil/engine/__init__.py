"""Training machinery: the layer-decay optimizer constructor, CPU multi-process support, train/test runs and the
checkpoint policy on MMEngine's loading paths."""
from .checkpoint_policy import CheckpointPolicyHook, load_model_checkpoint
from .distributed import CPUDistributedDataParallel, destroy_process_group, setup_cpu_distributed
from .entrypoints import load_config, run_test, run_train
from .optimizers import LayerDecayOptimWrapperConstructor, layer_depth_by_name
from .work_dir import RunRefused

__all__ = [
    'CheckpointPolicyHook', 'CPUDistributedDataParallel', 'LayerDecayOptimWrapperConstructor', 'RunRefused',
    'destroy_process_group', 'layer_depth_by_name', 'load_config', 'load_model_checkpoint', 'run_test', 'run_train',
    'setup_cpu_distributed'
]
