#!/usr/bin/env bash
# Fills .whl/ with the OpenMMLab stack and the pure-Python packages it needs that the lent GPU machine's image
# (Python 3.12, torch 2.11) lacks; benchmarks/gpu_setup.sh installs them there. Run here, in the repo root.
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 addict yapf termcolor ftfy prettytable \
  wcwidth platformdirs mat4py modelindex model-index ordered-set importlib-metadata==8.5.0
ls .whl
