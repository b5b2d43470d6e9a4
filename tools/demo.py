"""The embedded demo (``make demo``): ViL against DeiT and Vim on a synthetic ADE20K, on a CPU, in minutes.

1. writes a synthetic ADE20K into data/ade_demo (unless it is there): 400 training and 50 validation 128x128
   images of 8 classes, each with its own colour and texture (mmseg_vil.datasets.synthetic_ade20k);
2. trains the demo UperNets of configs/demo (same neck, heads, data and schedule; only the backbone differs) from
   scratch with tools/train.py, one process per model, logging to WORK_DIR/<model>/ (replacing an earlier demo
   run there, unless --skip-train reuses it);
3. evaluates every checkpoint on the validation set and prints a comparison table (params, GFLOPs at 512x512,
   mIoU, aAcc, img/s), also written as WORK_DIR/comparison.{md,json,png};
4. segments a few validation images with every model: WORK_DIR/infer/<model>/{pred,vis}/.

    python tools/demo.py [--models vil,deit,vim] [--work-dir work_dirs/demo] [--skip-train]
"""
import argparse
import os
import os.path as osp
import shutil
import subprocess
import sys
import time
from typing import Dict, List

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODELS = ('vil', 'deit', 'vim')
DATA_ROOT = 'data/ade_demo/ADEChallengeData2016'  # as in configs/demo/_base_demo.py
PROGRESS_MARKERS = ('Iter(train)', 'Iter(val)', 'Saving checkpoint', 'Traceback', 'Error')  # lines to echo


def log(message: str) -> None:
    print(f'[demo] {message}', flush=True)


def ensure_dataset(num_train: int, num_val: int) -> None:
    """Generate the synthetic ADE20K unless a complete one is already in place."""
    from mmseg_vil.datasets import generate_ade20k

    def count(split: str) -> int:
        folder = osp.join(DATA_ROOT, 'annotations', split)
        return len(os.listdir(folder)) if osp.isdir(folder) else 0

    if count('training') >= num_train and count('validation') >= num_val:
        log(f'dataset: reusing {DATA_ROOT}')
        return
    log(f'dataset: writing {num_train} + {num_val} synthetic ADE20K images to {DATA_ROOT}')
    generate_ade20k(DATA_ROOT, num_train=num_train, num_val=num_val, size=(128, 128))


def train(model: str, work_dir: str) -> str:
    """Train one demo model with tools/train.py in its own process; echo its progress lines; return the checkpoint.

    A separate process per model keeps MMEngine's global state (loggers, visualizer, message hub) apart.
    """
    from mmseg_vil.engine.work_dir import latest_checkpoint

    config = osp.join('configs', 'demo', f'{model}_demo.py')
    console_log = osp.join(work_dir, 'train_console.log')
    if osp.isfile(console_log):  # tools/train.py refuses to overwrite a run; the demo replaces only its own
        log(f'{model}: replacing the previous demo run in {work_dir} (--skip-train reuses it instead)')
        shutil.rmtree(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    command = [sys.executable, osp.join('tools', 'train.py'), config, '--work-dir', work_dir]
    log(f'{model}: training {config} (full log: {console_log})')
    with open(console_log, 'w') as out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED='1'))
        for line in proc.stdout:
            out.write(line)
            if any(marker in line for marker in PROGRESS_MARKERS):
                print(f'  {model} | {line.rstrip()}', flush=True)
        proc.wait()
    checkpoint = latest_checkpoint(work_dir)
    if proc.returncode != 0 or checkpoint is None:
        raise RuntimeError(f'training {model} failed (exit code {proc.returncode}); see {console_log}')
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default=','.join(MODELS), help=f'comma-separated subset of {",".join(MODELS)}')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='where runs, table and overlays go')
    parser.add_argument('--skip-train', action='store_true', help='reuse the checkpoints of earlier runs')
    parser.add_argument('--num-train', type=int, default=400, help='synthetic training images')
    parser.add_argument('--num-val', type=int, default=50, help='synthetic validation images')
    parser.add_argument('--num-infer', type=int, default=4, help='validation images to segment with every model')
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(',') if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f'--models must name some of {MODELS}, got {args.models!r}')
    work_dir = osp.abspath(args.work_dir)
    os.chdir(ROOT)  # the demo configs name the dataset relative to the repository root

    start = time.perf_counter()
    # Imported only now, so that --help and argument errors answer without loading PyTorch and OpenMMLab.
    from mmseg_vil.apis import ModelSpec, compare, plot_comparison, render_markdown, segment_images, write_json
    from mmseg_vil.engine.work_dir import latest_checkpoint

    ensure_dataset(args.num_train, args.num_val)
    checkpoints: Dict[str, str] = {}
    for model in models:
        model_dir = osp.join(work_dir, model)
        if args.skip_train:
            checkpoints[model] = latest_checkpoint(model_dir)
            if checkpoints[model] is None:
                raise SystemExit(f'--skip-train: no finished run in {model_dir}; run without --skip-train first')
            log(f'{model}: reusing {checkpoints[model]}')
        else:
            t0 = time.perf_counter()
            checkpoints[model] = train(model, model_dir)
            log(f'{model}: trained in {time.perf_counter() - t0:.0f} s, {checkpoints[model]}')

    log('evaluating on the validation set, counting FLOPs at 512x512')
    specs = [ModelSpec(m, config=osp.join('configs', 'demo', f'{m}_demo.py'), checkpoint=checkpoints[m])
             for m in models]
    rows = compare(specs)
    table = render_markdown(rows)
    with open(osp.join(work_dir, 'comparison.md'), 'w') as f:
        f.write(table + '\n')
    write_json(rows, osp.join(work_dir, 'comparison.json'))
    plot_comparison(rows, osp.join(work_dir, 'comparison.png'))

    val_images: List[str] = sorted(os.listdir(osp.join(DATA_ROOT, 'images', 'validation')))[:args.num_infer]
    val_paths = [osp.join(DATA_ROOT, 'images', 'validation', name) for name in val_images]
    for spec in specs:
        out_dir = osp.join(work_dir, 'infer', spec.name)
        summary = segment_images(spec.config, spec.checkpoint, val_paths, out_dir, progress=False)
        log(f'{spec.name}: {len(summary.outputs)} overlays in {out_dir}/vis')

    print('\n' + table + '\n')
    log('chance level: a constant or random prediction stays below 12.5% mIoU on these 8 classes')
    log(f'table, JSON and chart in {work_dir}/comparison.*')
    log(f'total wall time {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main()
