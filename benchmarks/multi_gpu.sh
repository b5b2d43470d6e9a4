#!/usr/bin/env bash
# Issue 13 on one host with 2 GPUs (here the nvidia-h200-x2 kind): UperNet ViL-T (and DeiT-T) trained by
# tools/dist_train.sh on 2 GPUs against the same global batch of 16 on 1 GPU, and a rank killed mid-run, then resumed.
# Usage on the lent machine, one part per call (each takes a few minutes; a call may take 10):
#   bash benchmarks/multi_gpu.sh OUT_DIR PART...
#   equal         1x16 vs 2x8 images, 20 iterations, --amp, SyncBN active on 2 GPUs, ViL-T and DeiT-T: per iteration
#                 the global loss (mean of the ranks'), the gradient norm and the images; the final weights
#   speed-vil-t   the recipe unchanged (random augmentation), 300 iterations, --amp: img/s on 2 GPUs vs 1 GPU
#   speed-deit-t  the same for DeiT-T
#   resume        2 GPUs, a checkpoint every 50 iterations; rank 1 killed (SIGKILL) at iteration 130, then
#                 `dist_train.sh ... --resume` to 200; against the same run uninterrupted: restarts at 101, with the
#                 same learning rates and the same images (no data lost or repeated), losses close
# Data: generated ADE20K-layout folders (150 classes, 64 training images): 512x683 for the recipe's random
# resize-and-crop to 512, 512x512 for `equal`. `equal` differs from the recipe only where a batch split legitimately
# changes the numbers (as tests/configs/upernet_vil-tiny_synthetic-64x64_cpu-ddp.py, which tests the same on CPU):
# no random transforms (each data worker has its own RNG stream, seeded by rank and worker), cross-entropy over all
# pixels (avg_non_ignore=False: each rank would divide by its own count of labelled pixels), a constant lr (the
# warm-up's first 20 steps hardly move the weights), gradient clipping at 1e9 (only to log the gradient norm).
# Weights are random (no pretrained files on the machine); the speed does not depend on them.
# Runs, logs and checkpoints stay in WORK (default /tmp/multi_gpu); OUT_DIR gets <part>.md per part (environment,
# commands, benchmarks/multi_gpu_compare.py's report) and the logs' tails on failure.
set -u
out=${1:?usage: $0 OUT_DIR PART...}
shift
work=${WORK:-/tmp/multi_gpu}
mkdir -p "$out" "$work/configs"
source benchmarks/gpu_setup.sh
# This workplace's rule for its shared hosts, not a requirement of the code: NVLink multicast stays off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHON=python3 PYTHONPATH=$PYTHONPATH:$PWD/tests/configs  # the record hooks: tests/configs/rank_state_hook.py
port=29500

declare -A shipped=([vil-t]=configs/vil/upernet_vil-t16_1xb16-160k_ade20k-512x512.py
                    [deit-t]=configs/vit/upernet_deit-t16_1xb16-160k_ade20k-512x512.py)

environment() {
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null | head -4
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      'nccl', '.'.join(map(str, torch.cuda.nccl.version())), 'GPUs', torch.cuda.device_count())"
  env | grep -E '^(NCCL|TORCH_NCCL|TORCH_SYMM|NVSHMEM)_' | sort
}

make_data() {  # make_data NAME H W: a generated ADEChallengeData2016 folder, once; prints its path
  local root=$work/$1/ADEChallengeData2016
  if [ ! -d "$root" ]; then
    python3 tools/generate_ade20k.py "$root.partial" --num-train 64 --num-val 4 --size "$2" "$3" --num-classes 150 \
      > /dev/null && mv "$root.partial" "$root" || return
  fi
  echo "$root"
}

write_configs() {  # recipe_<model>.py (the shipped config + record hook) and equal_<model>.py, for both models
  local model
  for model in "${!shipped[@]}"; do
    cat > "$work/configs/recipe_$model.py" <<EOF
_base_ = ['$PWD/${shipped[$model]}']
custom_imports = dict(imports=['mmseg_vil', 'rank_state_hook'], allow_failed_imports=False)
custom_hooks = [dict(type='SaveRankIterationsHook')]
model = dict(backbone=dict(init_cfg=None))
randomness = dict(seed=0)
train_cfg = dict(val_interval=1000000)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=1000000, save_last=False))
EOF
    cat > "$work/configs/equal_$model.py" <<EOF
_base_ = ['./recipe_$model.py']
custom_hooks = [dict(type='SaveRankIterationsHook'), dict(type='SaveRankStateHook')]
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
                  dict(type='PackSegInputs')]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
model = dict(decode_head=dict(loss_decode=dict(avg_non_ignore=False)),
             auxiliary_head=dict(loss_decode=dict(avg_non_ignore=False)))
optim_wrapper = dict(clip_grad=dict(max_norm=1e9, norm_type=2))
param_scheduler = []
EOF
  done
}

train() {  # train RUN CONFIG GPUS DATA ITERS [tools/train.py options]: 16 images per iteration over GPUS processes
  local run=$1 config=$2 gpus=$3 data=$4 iters=$5
  shift 5
  local args=("$config" --amp --work-dir "$work/$run" "$@" --cfg-options train_cfg.max_iters="$iters"
              train_dataloader.batch_size=$((16 / gpus)) train_dataloader.dataset.data_root="$data"
              val_dataloader.dataset.data_root="$data" test_dataloader.dataset.data_root="$data")
  port=$((port + 1))
  if [ "$gpus" = 1 ]; then
    echo "python3 tools/train.py ${args[*]}" | tee -a "$summary"
    timeout 420 python3 tools/train.py "${args[@]}" >> "$work/$run.log" 2>&1
  else
    echo "PORT=$port bash tools/dist_train.sh $config $gpus ${args[*]:1}" | tee -a "$summary"
    PORT=$port timeout 420 bash tools/dist_train.sh "$config" "$gpus" "${args[@]:1}" >> "$work/$run.log" 2>&1
  fi
  local status=$?
  if [ $status != 0 ]; then
    echo "$run: exit $status; log tail in $out/$run.tail" | tee -a "$summary"
    tail -60 "$work/$run.log" > "$out/$run.tail"
  fi
  return $status
}

compare() {  # compare REPORT RUN_A RUN_B [options]: benchmarks/multi_gpu_compare.py into the summary
  python3 benchmarks/multi_gpu_compare.py "$1" "$work/$2" "$work/$3" "${@:4}" 2>&1 | tee -a "$summary"
}

layout_warnings() {  # DDP's gradient bucket layout warning in a run's log (expected: none with the fused kernels)
  echo "$1: $(grep -c 'Grad strides do not match bucket view strides' "$work/$1.log") bucket layout warnings" \
    | tee -a "$summary"
}

rank_pid() {  # rank_pid LAUNCHER_PID RANK: that rank's training process, the shallowest descendant with RANK set
  local pids=$1 pid
  while [ -n "$pids" ]; do
    for pid in $pids; do
      if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "RANK=$2"; then echo "$pid"; return; fi
    done
    pids=$(for pid in $pids; do pgrep -P "$pid"; done)
  done
}

part_equal() {
  local data model
  data=$(make_data data_square 512 512) || return
  for model in vil-t deit-t; do
    echo -e "\n### $model: 1x16 (A) vs 2x8 (B)\n" | tee -a "$summary"
    rm -rf "$work/equal_${model}_1gpu" "$work/equal_${model}_2gpu"
    train "equal_${model}_1gpu" "$work/configs/equal_$model.py" 1 "$data" 20 &&
      train "equal_${model}_2gpu" "$work/configs/equal_$model.py" 2 "$data" 20 &&
      layout_warnings "equal_${model}_2gpu" &&
      # fp16 autocast keeps about 3 significant digits: a first guess at the tolerances, to review with the table.
      compare equal "equal_${model}_1gpu" "equal_${model}_2gpu" --rtol 1e-2 --weight-atol 2.5e-3 --expect-sync-bn
  done
}

part_speed() {  # part_speed MODEL
  local data
  data=$(make_data data_recipe 512 683) || return
  echo -e "\n### $1: 1x16 (A) vs 2x8 (B), recipe, 300 iterations\n" | tee -a "$summary"
  rm -rf "$work/speed_$1_1gpu" "$work/speed_$1_2gpu"
  train "speed_$1_1gpu" "$work/configs/recipe_$1.py" 1 "$data" 300 &&
    train "speed_$1_2gpu" "$work/configs/recipe_$1.py" 2 "$data" 300 &&
    layout_warnings "speed_$1_2gpu" &&
    compare speed "speed_$1_1gpu" "speed_$1_2gpu" --skip 50 --target 1.85
}

part_resume() {
  local data config=$work/configs/recipe_vil-t.py launcher victim checkpoint from_iter
  local every=(--cfg-options default_hooks.checkpoint.interval=50)
  data=$(make_data data_recipe 512 683) || return
  echo -e "\n### vil-t on 2 GPUs: uninterrupted (A) vs killed at 130 and resumed (B)\n" | tee -a "$summary"
  rm -rf "$work/resume_reference" "$work/resume_killed" "$work/resume_killed.log"
  train resume_reference "$config" 2 "$data" 200 "${every[@]}" || return
  train resume_killed "$config" 2 "$data" 200 "${every[@]}" &
  launcher=$!
  port=$((port + 1))  # the run in the background took the next port in its own copy of the counter
  until grep -q 'Iter(train) \[130/200\]' "$work/resume_killed.log" 2>/dev/null; do
    kill -0 $launcher 2>/dev/null || { echo 'the run ended before iteration 130' | tee -a "$summary"; return 1; }
    sleep 1
  done
  victim=$(rank_pid $launcher 1)
  [ -n "$victim" ] || { echo 'no process of rank 1 found' | tee -a "$summary"; return 1; }
  echo "iteration 130 logged: kill -9 rank 1 (pid $victim)" | tee -a "$summary"
  kill -9 "$victim"
  wait $launcher
  echo "the launcher exited with status $? (expected: non-zero)" | tee -a "$summary"
  checkpoint=$(cat "$work/resume_killed/last_checkpoint")
  from_iter=$(basename "$checkpoint" .pth)
  from_iter=${from_iter#iter_}
  echo "last checkpoint: $checkpoint" | tee -a "$summary"
  train resume_killed "$config" 2 "$data" 200 --resume "${every[@]}" || return
  grep -E 'resumed epoch|Advance dataloader' "$work/resume_killed.log" | sed 's/^.* - //' | tee -a "$summary"
  # Same data and weights at the restart; only GPU nondeterminism (e.g. cuDNN's algorithm choice) may differ.
  compare resume resume_reference resume_killed --from-iter "$from_iter" --rtol 1e-2
}

write_configs
for part in "$@"; do
  summary=$out/$part.md
  { echo "## multi_gpu.sh $part"; echo; echo '```'; environment; echo '```'; echo; } > "$summary"
  case $part in
    equal) part_equal ;;
    speed-vil-t) part_speed vil-t ;;
    speed-deit-t) part_speed deit-t ;;
    resume) part_resume ;;
    *) echo "unknown part $part" | tee -a "$summary" ;;
  esac
done
