"""Training machinery: the layer-decay optimizer constructor, CPU multi-process support and train/test runs."""
from .distributed import CPUDistributedDataParallel, setup_cpu_distributed
from .entrypoints import load_config, run_test, run_train
from .optimizers import LayerDecayOptimWrapperConstructor, layer_depth_by_name

__all__ = [
    'CPUDistributedDataParallel', 'LayerDecayOptimWrapperConstructor', 'layer_depth_by_name', 'load_config',
    'run_test', 'run_train', 'setup_cpu_distributed'
]
