#!/usr/bin/env bash
# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
# Data-parallel training with torchrun: one process per GPU (or per CPU worker with env_cfg.dist_cfg.backend=gloo).
#   tools/dist_train.sh CONFIG NUM_PROCS [tools/train.py options]
# Interpreter and multi-node settings: see tools/dist_launch.sh.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_PROCS [train.py options]" >&2
    exit 2
fi
TOOLS="$(dirname "$0")"
exec bash "$TOOLS/dist_launch.sh" "$2" "$TOOLS/train.py" "$1" --launcher pytorch "${@:3}"
