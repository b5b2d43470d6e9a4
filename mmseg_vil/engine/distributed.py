# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Multi-process training and testing on machines without CUDA (torchrun + gloo).

MMEngine's ``pytorch`` launcher assumes GPUs twice: ``init_dist`` calls ``torch.cuda.set_device(LOCAL_RANK)``, and
``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to ``DistributedDataParallel``, which DDP rejects for a
model on CPU. :func:`setup_cpu_distributed` works around both, so that the distributed code path (gradient
all-reduce, sharded sampling, rank-0 checkpointing) can be exercised on CPU; on a CUDA machine it does nothing.
"""
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for a model that lives on CPU.

    The Runner always supplies ``device_ids=[LOCAL_RANK]``; DDP only accepts ``None`` for CPU modules, so it is
    dropped here.
    """

    def __init__(self, module: torch.nn.Module, device_ids=None, **kwargs) -> None:
        super().__init__(module=module, device_ids=None, **kwargs)


def setup_cpu_distributed(cfg: Config) -> None:
    """Initialise the process group and choose :class:`CPUDistributedDataParallel` for a CPU torchrun launch.

    Acts only for ``cfg.launcher == 'pytorch'`` without CUDA. The backend and timeout come from
    ``cfg.env_cfg.dist_cfg``; it must be a CPU backend (``gloo``).
    """
    if cfg.get('launcher', 'none') != 'pytorch' or torch.cuda.is_available() or torch_dist.is_initialized():
        return
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.get('backend', 'gloo')
    if backend == 'nccl':
        raise ValueError('No CUDA device: NCCL cannot run; set env_cfg.dist_cfg.backend=gloo for CPU training')
    timeout = dist_cfg.get('timeout')
    torch_dist.init_process_group(backend=backend, **({'timeout': timedelta(seconds=timeout)} if timeout else {}))
    cfg.model_wrapper_cfg = dict(type='CPUDistributedDataParallel', broadcast_buffers=False,
                                 find_unused_parameters=cfg.get('find_unused_parameters', False))
