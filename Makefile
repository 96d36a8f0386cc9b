# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format clean

# torch/torchvision are pinned to the builds pip finds on this machine's disk;
# they are installed first so that packages that look for torch while they
# build (deepspeed) see it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[cpu,dev]'
	# DeepSpeed's CPU comm op, compiled once into this venv (pipeline.train.engine.build_cpu_ops)
	# so that no rank compiles it while another loads it.
	$(BIN)/python -c 'from pipeline.train.engine import build_cpu_ops; build_cpu_ops()'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
