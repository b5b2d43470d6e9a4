# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Multi-process training and testing on machines without CUDA (torchrun + gloo).

MMEngine's ``pytorch`` launcher assumes GPUs three times: ``init_dist`` calls ``torch.cuda.set_device(LOCAL_RANK)``,
``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to ``DistributedDataParallel`` (which DDP rejects for a model
on CPU), and it keeps SyncBN layers, which only run on GPUs. :func:`setup_cpu_distributed` works around all three, so
that the distributed code path (gradient all-reduce, sharded sampling, rank-0 checkpointing) runs on CPU with the
unchanged configs; on a CUDA machine it does nothing.
"""
import gc
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for a model that lives on CPU.

    The Runner always supplies ``device_ids=[LOCAL_RANK]``; DDP only accepts ``None`` for CPU modules, so it is
    dropped here. SyncBN layers become BN: each process normalises with the statistics of its own batch.
    """

    def __init__(self, module: torch.nn.Module, device_ids=None, **kwargs) -> None:
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()):
            print_log('CPU data parallel: SyncBN needs GPUs, using per-process BN', logger='current')
            module = revert_sync_batchnorm(module)
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


def destroy_process_group() -> None:
    """Shut down the default process group, if one was initialised, and join its worker threads; a no-op otherwise.

    MMEngine never does this. A gloo group outlives ``destroy_process_group`` while anything still refers to it, and
    a finished Runner does, through reference cycles (its DDP wrapper keeps the group). Its worker threads then run
    into interpreter teardown: one that releases a finished collective there needs the GIL, cannot get it, and the
    process aborts ("terminate called without an active exception", SIGABRT) after the run itself succeeded. The
    cycle collection here frees the group, which joins the threads, while the interpreter is still alive.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        gc.collect()
