#!/usr/bin/env bash
# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
# Data-parallel evaluation with torchrun (the test set is split over the processes, metrics gathered on rank 0).
#   tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [tools/test.py options]
# Interpreter and multi-node settings: see tools/dist_launch.sh.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_PROCS [test.py options]" >&2
    exit 2
fi
TOOLS="$(dirname "$0")"
exec bash "$TOOLS/dist_launch.sh" "$3" "$TOOLS/test.py" "$1" "$2" --launcher pytorch "${@:4}"
