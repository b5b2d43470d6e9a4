# Source on the lent GPU machine: installs the OpenMMLab wheels carried in .whl/ (made here by benchmarks/download_wheels.sh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
