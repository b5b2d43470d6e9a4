#!/usr/bin/env bash
# The GPU run behind benchmarks/RESULTS.md: backbones (eager), UperNet, torch.compile, on one card, one process each.
# Usage on the lent machine: bash benchmarks/run_gpu_suite.sh $OUT
set -u
out=${1:-work_dirs/gpu_suite}
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/log.txt"
common="--iters 6 --warmup 2 --modes train infer"
timeout 330 python3 tools/benchmark.py $common --scopes backbone --sizes 224 512 1024 2048 \
  --models vil-t vil-t@parallel deit-t vim-t vil-s deit-s vim-s vil-b deit-b \
  --out-dir "$out/backbone" 2>&1 | grep -v -i warn | tee -a "$out/log.txt"
timeout 90 python3 tools/benchmark.py $common --scopes upernet --sizes 512 --models vil-t deit-t vim-t \
  --out-dir "$out/upernet" 2>&1 | grep -v -i warn | tee -a "$out/log.txt"
timeout 120 python3 tools/benchmark.py --iters 6 --warmup 3 --modes train --compile --scopes backbone \
  --sizes 224 512 --models vil-t deit-t --out-dir "$out/compiled" 2>&1 | grep -v -i warn | tee -a "$out/log.txt"
rm -f "$out"/upernet/benchmark.png "$out"/compiled/benchmark.png "$out"/*/benchmark.md
for d in "$out"/*/; do [ -f "$d/benchmark.json" ] && rm -f "$d/benchmark.partial.json"; done
