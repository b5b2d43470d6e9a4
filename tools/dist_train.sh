#!/usr/bin/env bash
# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
# Data-parallel training with torchrun: one process per GPU (or per CPU worker with env_cfg.dist_cfg.backend=gloo).
#   tools/dist_train.sh CONFIG NUM_PROCS [tools/train.py options]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node. PYTHON selects the interpreter.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_PROCS [train.py options]" >&2
    exit 2
fi
CONFIG=$1
NUM_PROCS=$2
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NUM_PROCS" \
    "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "${@:3}"
