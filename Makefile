# optiserve — every target sets up what it needs in .venv (created on first use).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
PYTEST_ARGS ?= -n 2

.PHONY: serve test lint typecheck collect-check bench models clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# make lint and make typecheck need only the runtime and the linters (the lint extra), not the test install below.
$(VENV)/.lint: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -q -e '.[lint]'
	touch $@

# The converter extras (server/convert) are part of the test install: torch first, pinned to the CPU wheel
# (TORCH_SPEC; a bare "torch" would pull a CUDA build of several GB), then the extras (about 30 s, 2.8 GB).
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test,torch,sklearn,tensorflow,extensions]'
	bash bench/install-perf-analyzer.sh $(VENV) >/dev/null
	bash tests/deploy/install-promtool.sh $(VENV) >/dev/null
	touch $@

model_repo/example/1/model.onnx: | $(VENV)/.runtime
	$(PY) model_repo/make_example.py

models: model_repo/example/1/model.onnx

serve: $(VENV)/.runtime models
	$(VENV)/bin/optiserve serve --model-repository model_repo --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

lint: $(VENV)/.lint
	$(VENV)/bin/ruff check server optimizers tests bench model_repo/make_example.py
	$(VENV)/bin/ruff format --check server optimizers tests bench model_repo/make_example.py

typecheck: $(VENV)/.lint
	$(VENV)/bin/mypy

# pytest-xdist stops when its workers collect different test ids (an id made from random bytes or a timestamp):
# collect twice in separate processes first and name the ids that differ.
collect-check: $(VENV)/.test
	$(PY) tests/check_collection.py tests

test: $(VENV)/.test models lint typecheck collect-check
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests

# Benchmarks (minutes, not part of make test): serving vs raw onnxruntime, the optimizer per model, metrics cost.
bench: $(VENV)/.test
	$(PY) -m bench.run
	$(PY) -m bench.optimize
	$(PY) -m bench.metrics_cost
	$(PY) -m bench.ready

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/out
