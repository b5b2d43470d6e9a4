#!/usr/bin/env bash
# tools/train.py seconds per iteration, UperNet ViL-T vs DeiT-T on generated ADE20K-layout data (512 crops, batch 16,
# --amp), the user's path end to end (data loading, MMEngine loop, optimizer wrapper). Usage: train_speed.sh OUT_DIR
# ITERS (default 60) sets the iterations; CFG, one more --cfg-options entry for both models, e.g.
# CFG=compile=reduce-overhead (CUDA graphs, README "Compiled training").
set -u
out=${1:-work_dirs/train_speed}
data=$out/ADEChallengeData2016
iters=${ITERS:-60}
python3 tools/generate_ade20k.py "$data" --num-train 64 --num-val 4 --size 512 683 --num-classes 150 > /dev/null
for config in configs/vil/upernet_vil-t16_1xb16-160k_ade20k-512x512.py configs/vit/upernet_deit-t16_1xb16-160k_ade20k-512x512.py; do
  name=$(basename "$config" .py)
  python3 tools/train.py "$config" --amp --work-dir "$out/$name" --cfg-options \
    train_dataloader.dataset.data_root="$data" val_dataloader.dataset.data_root="$data" \
    test_dataloader.dataset.data_root="$data" train_dataloader.num_workers=8 train_cfg.max_iters=$iters \
    train_cfg.val_interval=100000 default_hooks.logger.interval=10 default_hooks.checkpoint.interval=100000 \
    model.backbone.init_cfg=None ${CFG:+"$CFG"} \
    > "$out/$name.log" 2>&1
  echo "$name: exit $? $(grep -o "Iter(train) \[ *$iters/$iters\].* time: [0-9.]*" "$out/$name.log" | grep -o 'time: [0-9.]*$') s/iter (last 10 iterations)"
done
