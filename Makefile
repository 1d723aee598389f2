# ViMDet: `make demo` trains and evaluates a small detector on the built-in dataset; `make test`
# runs the whole test suite (what CI runs), `make test-quick` its unit tests only. All first build
# .venv (once; later runs reuse it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vimdet-ready
DEMO_CONFIG ?= configs/shapes/cascade_vim_mini_shapes.yaml

.PHONY: venv test test-quick test-gpu demo lint format clean

venv: $(STAMP)

# torch/torchvision come from requirements.txt; detectron2 (not on PyPI) from
# tools/install_detectron2.py, which keeps a detectron2 the environment already has.
$(STAMP): requirements.txt pyproject.toml setup.py tools/install_detectron2.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# Every tier: -m "" lifts pyproject's default selection of the quick tests (it leaves out the
# tests marked slow and distributed).
test: venv
	$(PY) -m pytest tests -q -m ""

test-quick: venv
	$(PY) -m pytest tests -q

# On a GPU machine with mamba-ssm: the CUDA tests (they skip cleanly elsewhere).
test-gpu: venv
	$(PY) -m pytest tests/gpu -q

# One compute thread (OMP_NUM_THREADS=1): on this project's 2 shared cores, two threads that wait
# for each other in every parallel op made a step 2-8x slower (docs/benchmarks.md); the data-loading
# worker uses the other core. A fixed thread count also keeps the demo's AP the same on any machine.
demo: venv
	OMP_NUM_THREADS=1 $(PY) tools/train_net.py --config-file $(DEMO_CONFIG)

lint: venv
	$(VENV)/bin/ruff check vimdet tools tests setup.py
	$(VENV)/bin/ruff format --check vimdet tools tests setup.py

format: venv
	$(VENV)/bin/ruff check --fix vimdet tools tests setup.py

clean:
	rm -rf $(VENV) build *.egg-info
