#!/usr/bin/env bash
# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
# Data-parallel evaluation with torchrun (the test set is split over the processes, metrics gathered on rank 0).
#   tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [tools/test.py options]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node. PYTHON selects the interpreter.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_PROCS [test.py options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NUM_PROCS=$3
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NUM_PROCS" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
