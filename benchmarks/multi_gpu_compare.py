"""Compare data-parallel training runs from the records of tests/configs/rank_state_hook.py (multi_gpu.sh's checks).

A run's work dir holds ``rank<r>_iters.json`` of every rank (and ``rank<r>_{before,after}.pth`` where the config
saves weights). Three reports, each printed as Markdown; the exit status is 1 if a check fails:

* ``equal A B``: B (several processes) trained like A (one) at the same global batch: the same images per iteration,
  global losses (mean of the ranks' losses: right when every rank averages over the same number of pixels) and
  gradient norms within ``--rtol``, final weights within ``--weight-atol`` (and, with ``--expect-sync-bn``, B kept
  its SyncBN layers).
* ``speed A B``: images per second of each run after ``--skip`` warm-up iterations, and B's speed-up over A.
* ``resume A B``: B resumed A's configuration from the checkpoint of iteration ``--from-iter``, and continued like the
  uninterrupted run A: it starts at the next iteration with the same learning rates and the same images, and its
  losses stay within ``--rtol`` of A's.
"""
import argparse
import glob
import json
import math
import os.path as osp
import sys
from typing import List, Optional, Tuple

BN_STATISTICS = ('running_mean', 'running_var')


def load_steps(work_dir: str) -> Tuple[int, List[dict]]:
    """``(SyncBN layers, steps)``; a step is one iteration seen from all ranks.

    Step keys: ``iteration``, ``loss`` (the ranks' mean), ``grad_norms`` (one per rank), ``lr`` (rank 0's, all
    parameter groups), ``images`` (all ranks' file names, sorted) and ``time`` (when rank 0 finished the step).
    """
    paths = sorted(glob.glob(osp.join(work_dir, 'rank*_iters.json')), key=lambda p: int(osp.basename(p)[4:-11]))
    if not paths:
        raise FileNotFoundError(f'no rank*_iters.json in {work_dir}: did the run use SaveRankIterationsHook?')
    records = [json.load(open(path)) for path in paths]
    steps = []
    for per_rank in zip(*(record['iterations'] for record in records)):
        if len({rank['iteration'] for rank in per_rank}) != 1:
            raise ValueError(f'{work_dir}: the ranks recorded different iterations {per_rank}')
        steps.append(
            dict(iteration=per_rank[0]['iteration'],
                 loss=sum(rank['losses']['loss'] for rank in per_rank) / len(per_rank),
                 grad_norms=[rank['grad_norm'] for rank in per_rank],
                 lr=per_rank[0]['lr'],
                 images=sorted(image for rank in per_rank for image in rank['images']),
                 time=per_rank[0]['time']))
    return records[0]['sync_bn_layers'], steps


def _relative(a: float, b: float) -> float:
    """|a - b| / |b|; 0 when both are the same infinity or NaN (an fp16 step skipped in both runs)."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / abs(b) if b else math.inf


def _weight_difference(run_a: str, run_b: str) -> Optional[Tuple[float, float]]:
    """``(max |B - A|, max |A - A before|)`` over rank 0's final weights, or None if the runs saved none.

    BatchNorm running statistics are left out: they move with the data's scale, not with the learning rate.
    """
    files = [osp.join(run, f'rank0_{stage}.pth') for run, stage in ((run_a, 'after'), (run_b, 'after'),
                                                                    (run_a, 'before'))]
    if not all(osp.exists(f) for f in files):
        return None
    import torch
    after_a, after_b, before_a = (torch.load(f, map_location='cpu', weights_only=True) for f in files)
    floats = [k for k, v in after_a.items() if v.is_floating_point() and not k.endswith(BN_STATISTICS)]
    return (max((after_b[k].double() - after_a[k].double()).abs().max().item() for k in floats),
            max((after_a[k].double() - before_a[k].double()).abs().max().item() for k in floats))


def report_equal(run_a: str, run_b: str, rtol: float, weight_atol: float, expect_sync_bn: bool = False) -> List[str]:
    """Print the per-iteration comparison; return the failed checks."""
    (sync_a, steps_a), (sync_b, steps_b) = load_steps(run_a), load_steps(run_b)
    failures = [] if sync_b or not expect_sync_bn else ['B ran without SyncBN']
    print(f'SyncBN layers: {sync_a} (A), {sync_b} (B)\n')
    print('| iteration | loss A | loss B | rel. diff | grad norm A | grad norm B | rel. diff | same images |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    if [s['iteration'] for s in steps_a] != [s['iteration'] for s in steps_b]:
        failures.append('the runs recorded different iterations')
    other_images, beyond_rtol, rank_disagreement = [], [], []
    for a, b in zip(steps_a, steps_b):
        loss_diff = _relative(b['loss'], a['loss'])
        norms = [n for n in (a['grad_norms'][0], b['grad_norms'][0]) if n is not None]
        norm_diff = _relative(*norms) if len(norms) == 2 else 0.0
        same_images = a['images'] == b['images']
        print(f"| {a['iteration']} | {a['loss']:.6f} | {b['loss']:.6f} | {loss_diff:.1e} | "
              + ' | '.join('-' if n is None else f'{n:.5g}' for n in (a['grad_norms'][0], b['grad_norms'][0]))
              + f' | {norm_diff:.1e} | {same_images} |')
        if not same_images:
            other_images.append(a['iteration'])
        if loss_diff > rtol or norm_diff > rtol:
            beyond_rtol.append(a['iteration'])
        if len(set(map(str, b['grad_norms']))) > 1:
            rank_disagreement.append(a['iteration'])
    for iterations, problem in ((other_images, 'other images'),
                                (beyond_rtol, f'loss or gradient norm beyond rtol={rtol}'),
                                (rank_disagreement, "B's ranks saw different gradients")):
        if iterations:
            failures.append(f'{problem} at iterations {iterations}')
    weights = _weight_difference(run_a, run_b)
    if weights is not None:
        print(f'\nfinal weights: max |B - A| = {weights[0]:.2e} (A moved by up to {weights[1]:.2e})')
        if weights[0] > weight_atol:
            failures.append(f'final weights differ by {weights[0]:.2e} > {weight_atol}')
    return failures


def images_per_second(steps: List[dict], skip: int) -> float:
    """Images per second from the step end times, after ``skip`` warm-up iterations."""
    timed = steps[skip:]
    if len(timed) < 2:
        raise ValueError(f'{len(steps)} iterations recorded; need more than skip={skip} + 1')
    return sum(len(s['images']) for s in timed[1:]) / (timed[-1]['time'] - timed[0]['time'])


def report_speed(run_a: str, run_b: str, skip: int, target: float) -> List[str]:
    speed_a, speed_b = (images_per_second(load_steps(run)[1], skip) for run in (run_a, run_b))
    print(f'| run | img/s |\n| --- | --- |\n| A | {speed_a:.1f} |\n| B | {speed_b:.1f} |\n')
    print(f'speed-up B / A: {speed_b / speed_a:.2f}x (target {target}x)')
    return [] if speed_b / speed_a >= target else [f'speed-up {speed_b / speed_a:.2f}x < {target}x']


def report_resume(run_a: str, run_b: str, from_iter: int, rtol: float) -> List[str]:
    steps_a = {s['iteration']: s for s in load_steps(run_a)[1]}
    steps_b = load_steps(run_b)[1]
    failures = []
    if steps_b[0]['iteration'] != from_iter + 1:
        failures.append(f"the resumed run started at iteration {steps_b[0]['iteration']}, not {from_iter + 1}")
    common = [s for s in steps_b if s['iteration'] in steps_a]
    if not common:
        return failures + ['no iteration in common with the uninterrupted run']
    lr_equal = all(s['lr'] == steps_a[s['iteration']]['lr'] for s in common)
    images_equal = all(s['images'] == steps_a[s['iteration']]['images'] for s in common)
    loss_diff = max(_relative(s['loss'], steps_a[s['iteration']]['loss']) for s in common)
    print(f"resumed at iteration {steps_b[0]['iteration']} (checkpoint of {from_iter}); iterations "
          f"{common[0]['iteration']}-{common[-1]['iteration']} against the uninterrupted run: learning rates equal: "
          f'{lr_equal}, images equal: {images_equal}, max loss rel. diff {loss_diff:.1e}')
    failures += [] if lr_equal else ['other learning rates after the resume']
    failures += [] if images_equal else ['other images after the resume: data lost or repeated']
    failures += [] if loss_diff <= rtol else [f'losses differ by {loss_diff:.1e} > {rtol}']
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('report', choices=['equal', 'speed', 'resume'])
    parser.add_argument('run_a', help='work dir of the reference run')
    parser.add_argument('run_b', help='work dir of the run compared with it')
    parser.add_argument('--rtol', type=float, default=1e-5, help='equal, resume: relative tolerance of the losses')
    parser.add_argument('--weight-atol', type=float, default=2e-5, help='equal: absolute tolerance of the weights')
    parser.add_argument('--expect-sync-bn', action='store_true', help='equal: fail unless B has SyncBN layers')
    parser.add_argument('--skip', type=int, default=50, help='speed: warm-up iterations left out')
    parser.add_argument('--target', type=float, default=1.85, help='speed: the speed-up B must reach')
    parser.add_argument('--from-iter', type=int, help='resume: the iteration of the checkpoint B resumed from')
    args = parser.parse_args(argv)
    if args.report == 'equal':
        failures = report_equal(args.run_a, args.run_b, args.rtol, args.weight_atol, args.expect_sync_bn)
    elif args.report == 'speed':
        failures = report_speed(args.run_a, args.run_b, args.skip, args.target)
    elif args.from_iter is None:
        parser.error('resume needs --from-iter')
    else:
        failures = report_resume(args.run_a, args.run_b, args.from_iter, args.rtol)
    print('\n' + ('OK' if not failures else 'FAILED: ' + '; '.join(failures)))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
