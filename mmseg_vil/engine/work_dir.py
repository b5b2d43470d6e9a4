# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Which checkpoint a training run starts from, decided before the run starts, so that no run overwrites another.

MMEngine writes a run's checkpoints and ``last_checkpoint`` directly into the work dir (logs go to a timestamped
sub-folder). A second, fresh run into the same work dir would overwrite the first run's ``iter_N.pth`` and redirect
its ``last_checkpoint``, so that a later ``--resume`` continues the wrong run. As MMSegmentation users expect one
run per work dir, :func:`plan_start` refuses that and names the two ways out (``--resume``, a fresh ``--work-dir``);
``--resume`` without a checkpoint to resume from is refused too, instead of silently starting from scratch.
"""
import glob
import os.path as osp
from typing import List, Optional


class RunRefused(RuntimeError):
    """A run that would overwrite earlier results or cannot do what was asked; the message says what to do."""


def run_checkpoints(work_dir: str) -> List[str]:
    """The checkpoint files and the ``last_checkpoint`` record an earlier run left in ``work_dir``."""
    found = sorted(glob.glob(osp.join(glob.escape(work_dir), '*.pth')))
    record = osp.join(work_dir, 'last_checkpoint')
    return found + [record] if osp.isfile(record) else found


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint ``last_checkpoint`` names, if that file exists."""
    try:
        with open(osp.join(work_dir, 'last_checkpoint')) as f:
            path = f.read().strip()
    except FileNotFoundError:
        return None
    return path if path and osp.isfile(path) else None


def _inside(path: str, folder: str) -> bool:
    return osp.dirname(osp.abspath(path)) == osp.abspath(folder)


def plan_start(work_dir: str, resume: Optional[str], load_from: Optional[str]) -> Optional[str]:
    """The checkpoint to resume from (``None``: a new run), or :class:`RunRefused` if starting would overwrite.

    Args:
        work_dir: where the run writes its checkpoints.
        resume: ``None`` (new run), ``'auto'`` (the latest checkpoint of ``work_dir``) or a checkpoint path.
        load_from: initial weights of a new run (``--load-from`` / the config's ``load_from``).
    """
    if resume == 'auto':
        latest = latest_checkpoint(work_dir)
        if latest is None:
            raise RunRefused(f'--resume: nothing to resume in {work_dir} (no last_checkpoint naming an existing '
                             'checkpoint); start a new run without --resume, or name a checkpoint: --resume PATH')
        return latest
    if resume is not None:
        if not osp.isfile(resume):
            raise RunRefused(f'--resume {resume}: no such checkpoint file')
        earlier = run_checkpoints(work_dir)
        if earlier and not _inside(resume, work_dir):
            raise RunRefused(f'--resume {resume} into {work_dir}, which holds the checkpoints of another run '
                             f'({", ".join(map(osp.basename, earlier))}) that the resumed run would overwrite: '
                             f'resume in the checkpoint\'s own work dir (--work-dir {osp.dirname(resume) or "."}) '
                             'or into a fresh --work-dir')
        return resume
    earlier = run_checkpoints(work_dir)
    if earlier:
        raise RunRefused(f'{work_dir} holds the checkpoints of an earlier run ({", ".join(map(osp.basename, earlier))})'
                         ', which a new run would overwrite: continue that run with --resume, or start the new one '
                         'in a fresh --work-dir')
    if load_from is not None and '://' not in load_from and not osp.isfile(load_from):
        raise RunRefused(f'load_from {load_from}: no such checkpoint file')
    return None
