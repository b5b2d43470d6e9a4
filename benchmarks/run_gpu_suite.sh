#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md, on one card, one process per part.
# Usage on the lent machine: bash benchmarks/run_gpu_suite.sh OUT_DIR [PART...]
#   tests     the mixer and norm kernel tests on CUDA (also through the chunkwise cell: its CUDA switch set), all of
#             them (no -x), failures summarised (-rf), the full output in tests.txt; about 7 minutes
#   celltests the same for the mLSTM cell: fused_chunkwise's kernel tests, the backends, whole-backbone agreement
#   backbone  ViL-T/S vs DeiT-T/S backbone training step, eager and CUDA graphs, 224/512/1024/2048
#   quick     the same for ViL-T vs DeiT-T at 224/512/1024 only
#   rest      what backbone adds to quick: ViL-S vs DeiT-S at 224/512/1024, all four at 2048
#   compile   ViL-T vs DeiT-T training step under torch.compile (default mode) at 224 and 512
#   highres   ViL-T with the quadratic (fused) and the chunkwise (fused_chunkwise) mLSTM vs DeiT-T at 1024 and 2048,
#             then a per-kernel profile of the chunkwise ViL-T step at 2048 (batch 2)
#   targets   every target of issue 10 in one call (about 8 minutes): ViL-T vs DeiT-T backbone training step at
#             224/512/1024/2048, eager and CUDA graphs (speed and peak memory), the cell against SDPA
#             (mlstm_kernel_check.py --targets), then train (20 iterations each)
#   crossover the quadratic (fused) against the chunkwise (fused_chunkwise) cell in the ViL-T step at 224 and 512, CUDA
#             graphs, with DeiT-T: where `auto` should switch (mlstm/__init__.py FUSED_CHUNKWISE_MIN_LEN)
#   chunkcheck  the fused_chunkwise kernel tests on CUDA (MMSEG_VIL_FUSED_CHUNKWISE_CUDA=1), then one check case
#             under compute-sanitizer's memcheck (the 2026-12-04 illegal memory access)
#   cell      the mLSTM cell alone against SDPA (benchmarks/mlstm_kernel_check.py --quick)
#   tune      the mixer's conv + q/k/v and gated-output kernels under candidate launch configurations (224, 512)
#   tuned     quick's 224 and 512 rows with the launch configurations tune found fastest (after tune)
#   tunebwd   tune for the conv backward's launch 1 (and 3) alone, 224 and 512 (tiles of 2 to 32 tokens, 2 or 4 warps)
#   sweep     tile configurations of the fused mLSTM kernel (mlstm_kernel_check.py --quick --sweep, bf16)
#   chunksweep  launch options of the chunkwise kernels (MMSEG_VIL_CHUNKWISE_LAUNCH, one process each): error at
#             N=4096 and CUDA-graph ms at ViL-T 2048 px and N=4096 against SDPA, GPU us per kernel
#   host      where the eager ViL-T step's host time goes (profile_vil_step.py --host-variants) at 224 b64 and 2048 b2
#   profile   per-kernel GPU time of a ViL-T training step (224 batch 64, 512 batch 32), PyTorch's kernels by launch
#             site
#   ncu       Nsight Compute metrics (speed of light, occupancy, warp stalls) of each mixer and mLSTM kernel, once
#   ncuchunk  the same for the chunkwise mLSTM kernels at ViL-T's 2048 px shape (batch 2, 16384 tokens, chunk 64)
#   casts     float32-output products for the projections' gradients and one _foreach_copy_ for the weight casts
#             against today's product + cast and one cast each (cast_launch_check.py; under a minute)
#   train     tools/train.py seconds per iteration, UperNet ViL-T vs DeiT-T, 512 crops, batch 16, --amp
#   traingraphs  the same with compile=reduce-overhead (CUDA graphs of the compiled parts), 30 iterations (the first ~10
#             compile: about 2 minutes per model)
#   base      A/B: the ViL-T/DeiT-T 224 training step and the fused mLSTM at ViL shapes (mlstm_kernel_check.py
#             --vil-shapes) of an older commit, carried as .base.tar (made by `git archive -o .base.tar COMMIT`),
#             then of this tree, on the same warm machine
# Environment: PART_TIMEOUT overrides the time limit (s) of tests, celltests and traingraphs, ITERS the iterations of
# traingraphs, so that parts can share one call of the lent machine.
set -u
out=${1:-work_dirs/gpu_suite}
shift
parts=${*:-tests celltests backbone cell profile train}
mkdir -p "$out"
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/log.txt"
bench="python3 tools/benchmark.py --modes train --iters 5 --warmup 2 --repeats 3 --execution eager graphs"
for part in $parts; do
  echo "=== $part $(date -u +%FT%TZ)" | tee -a "$out/log.txt"
  case $part in
    tests|celltests) files="tests/test_norm_ops.py tests/test_mixer_ops.py tests/test_vil_mixer.py"
             [ "$part" = celltests ] && files="tests/test_mlstm_fused_chunkwise.py tests/test_mlstm_backends.py"
             # -v: each test's name and outcome as it ends, so that a run cut off by the time limit still names them
             # -n 8 (pytest-xdist, in the lent machine's image): most of a test's time is Triton compiling, on the host's CPUs
             workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
             MMSEG_VIL_FUSED_CHUNKWISE_CUDA=1 timeout ${PART_TIMEOUT:-540} python3 -m pytest -v -rf -p no:cacheprovider $workers $files \
             -k "not interpreter" 2>&1 | tee "$out/$part.txt" | grep -E "FAILED|ERROR|passed|failed" | grep -v PASSED \
             | tail -25 | tee -a "$out/log.txt" ;;
    quick) timeout 300 $bench --models vil-t deit-t --sizes 224 512 1024 --batch 224=64 512=32 1024=8 \
             --out-dir "$out/quick" 2>&1 | grep -v -i warn | tail -30 | tee -a "$out/log.txt" ;;
    rest) timeout 300 $bench --models vil-s deit-s --sizes 224 512 1024 --batch 224=64 512=32 1024=8 \
             --out-dir "$out/rest_s" 2>&1 | grep -v -i warn | tail -30 | tee -a "$out/log.txt"
          timeout 200 $bench --models vil-t deit-t vil-s deit-s --sizes 2048 --batch 2048=2 \
             --out-dir "$out/rest_2048" 2>&1 | grep -v -i warn | tail -30 | tee -a "$out/log.txt" ;;
    compile) timeout 400 python3 tools/benchmark.py --modes train --iters 5 --warmup 3 --repeats 3 --execution compile \
             --models vil-t deit-t --sizes 224 512 --batch 224=64 512=32 --out-dir "$out/compile" 2>&1 \
             | grep -v -i warn | tail -30 | tee -a "$out/log.txt" ;;
    targets) timeout 290 $bench --models vil-t deit-t --sizes 224 512 1024 2048 --batch 224=64 512=32 1024=8 2048=2 \
             --out-dir "$out/targets" 2>&1 | grep -v -i warn | tail -30 | tee -a "$out/log.txt"
           timeout 60 python3 benchmarks/mlstm_kernel_check.py --targets 2>&1 | grep "|" | tee -a "$out/log.txt"
           ITERS=20 timeout 230 bash benchmarks/train_speed.sh "$out/train" 2>&1 | tail -5 | tee -a "$out/log.txt"
           rm -rf "$out/train/ADEChallengeData2016" "$out"/train/*/*.pth ;;
    crossover) timeout 200 python3 tools/benchmark.py --modes train --iters 5 --warmup 2 --repeats 3 --execution graphs \
             --models vil-t@fused vil-t@fused_chunkwise deit-t --sizes 224 512 --batch 224=64 512=32 \
             --out-dir "$out/crossover" 2>&1 | grep -v -i warn | tail -16 | tee -a "$out/log.txt" ;;
    highres) MMSEG_VIL_FUSED_CHUNKWISE_CUDA=1 timeout 300 $bench --models vil-t vil-t@fused_chunkwise deit-t \
             --sizes 1024 2048 --batch 1024=8 2048=2 --out-dir "$out/highres" 2>&1 | grep -v -i warn | tail -30 \
             | tee -a "$out/log.txt"
           MMSEG_VIL_FUSED_CHUNKWISE_CUDA=1 timeout 120 python3 benchmarks/profile_vil_step.py --backend fused_chunkwise \
             --size 2048 --batch 2 --out "$out/profile_2048_b2_chunkwise.txt" 2>&1 | head -30 | tee -a "$out/log.txt" ;;
    backbone) timeout 420 $bench --models vil-t deit-t vil-s deit-s --sizes 224 512 1024 2048 \
             --batch 224=64 512=32 1024=8 2048=2 --out-dir "$out/backbone" 2>&1 | grep -v -i warn | tail -60 \
             | tee -a "$out/log.txt" ;;
    chunkcheck) MMSEG_VIL_FUSED_CHUNKWISE_CUDA=1 timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
             tests/test_mlstm_fused_chunkwise.py -k "not interpreter" 2>&1 | tail -25 | tee -a "$out/log.txt"
           sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
           [ -n "$sanitizer" ] && timeout 200 "$sanitizer" --tool memcheck --print-limit 5 python3 \
             benchmarks/mlstm_kernel_check.py --child check 96 196 bfloat16 False False 2>&1 | tail -30 \
             | tee -a "$out/log.txt" ;;
    cell) timeout 240 python3 benchmarks/mlstm_kernel_check.py --out "$out/cell" --quick 2>&1 | tail -40 \
             | tee -a "$out/log.txt" ;;
    tune) timeout 420 python3 benchmarks/tune_mixer_kernels.py --out "$out/tune" --sizes 224 512 --quick 2>&1 \
             | grep -v -i warn | tail -80 | tee -a "$out/log.txt" ;;
    tunebwd) timeout 300 python3 benchmarks/tune_mixer_kernels.py --out "$out/tunebwd" --sizes 224 512 --quick \
             --only CONV_BACKWARD 2>&1 | grep -v -i warn | tail -24 | tee -a "$out/log.txt" ;;
    tuned) MMSEG_VIL_MIXER_LAUNCH_CONFIGS="$out/tune/best.json" timeout 200 $bench --models vil-t deit-t --sizes 224 512 \
             --batch 224=64 512=32 --out-dir "$out/tuned" 2>&1 | grep -v -i warn | tail -20 | tee -a "$out/log.txt" ;;
    chunksweep) timeout 540 python3 benchmarks/mlstm_kernel_check.py --chunkwise-sweep 2>&1 | tee "$out/chunksweep.txt" \
             | tail -40 | tee -a "$out/log.txt" ;;
    sweep) timeout 400 python3 benchmarks/mlstm_kernel_check.py --out "$out/sweep" --quick --sweep 2>&1 | grep "tile sweep\|DH=" \
             | tail -40 | tee -a "$out/log.txt" ;;
    host) for shape in "224 64" "2048 2"; do set -- $shape
            timeout 150 python3 benchmarks/profile_vil_step.py --host-variants --size $1 --batch $2 \
              --out "$out/host_variants.txt" 2>&1 | grep "ms to issue" | tee -a "$out/log.txt"; done ;;
    profile) for shape in "224 64" "512 32"; do set -- $shape
               timeout 120 python3 benchmarks/profile_vil_step.py --size $1 --batch $2 --out "$out/profile_$1.txt" \
               2>&1 | tail -45 | tee -a "$out/log.txt"; done ;;
    ncu|ncuchunk) ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null \
           | head -1)
         args=; name=ncu; [ "$part" = ncuchunk ] && args="--chunkwise 64" && name=ncu_chunkwise
         [ -n "$ncu_bin" ] && (cd benchmarks && timeout 300 "$ncu_bin" --nvtx --nvtx-include "measure/" \
           --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
           --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis python3 ncu_mixer_kernels.py $args \
           > "$out/$name.txt" 2>&1; tail -5 "$out/$name.txt" | tee -a "$out/log.txt") \
           || echo "no ncu on this machine" | tee -a "$out/log.txt" ;;
    casts) timeout 120 python3 benchmarks/cast_launch_check.py 2>&1 | tail -8 | tee -a "$out/log.txt" ;;
    train) timeout 400 bash benchmarks/train_speed.sh "$out/train" 2>&1 | tail -20 | tee -a "$out/log.txt" ;;
    traingraphs) CFG=compile=reduce-overhead ITERS=${ITERS:-30} timeout ${PART_TIMEOUT:-560} bash benchmarks/train_speed.sh \
             "$out/traingraphs" 2>&1 | tail -20 | tee -a "$out/log.txt"
           rm -rf "$out/traingraphs/ADEChallengeData2016" "$out"/traingraphs/*/*.pth ;;
    base) mkdir -p /tmp/base && tar -xf .base.tar -C /tmp/base && (cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base \
             timeout 150 $bench --models vil-t deit-t --sizes 224 --batch 224=64 --out-dir "$out/base224" 2>&1 \
             | grep -v -i warn | tail -12 | tee -a "$out/log.txt")
          for tree in /tmp/base "$PWD"; do echo "fused mLSTM of $tree" | tee -a "$out/log.txt"
            PYTHONPATH=/tmp/site:$tree timeout 120 python3 benchmarks/mlstm_kernel_check.py --vil-shapes 2>&1 \
              | grep "B=" | tee -a "$out/log.txt"; done ;;
  esac
done
rm -f "$out"/*/benchmark.png "$out"/*/benchmark.partial.json
