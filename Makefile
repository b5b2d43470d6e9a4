# Two entry points (see README): `make demo` runs the embedded demo, `make test` runs the test suite.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo env clean-env

env: $(STAMP)

$(STAMP): requirements/stack.txt requirements/deploy.txt setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/stack.txt -r requirements/deploy.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	# Editable installs skip setup.py's data_files: put the mmcv.ops stand-in's .pth into site-packages ourselves.
	$(PY) -c "import shutil, sysconfig; shutil.copy('mmseg_vil_mmcv_ops.pth', sysconfig.get_path('purelib'))"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) tools/demo.py

clean-env:
	rm -rf $(VENV)
