#!/usr/bin/env bash
# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
# Shared by dist_train.sh and dist_test.sh: run a Python tool in NUM_PROCS processes per node with torchrun.
#   tools/dist_launch.sh NUM_PROCS TOOL.py [tool arguments]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node. The interpreter is $PYTHON if set, else the
# project's .venv/bin/python when it exists (the environment `make env` creates), else python from PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
NUM_PROCS=$1
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NUM_PROCS" \
    "${@:2}"
