# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast test-slow lint format clean

# torch/torchvision are pinned to the builds pip finds on this machine's disk;
# they are installed first so that packages that look for torch while they
# build (deepspeed) see it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[cpu,dev,export]'
	# DeepSpeed's CPU comm op, compiled once into this venv (pipeline.train.engine.build_cpu_ops)
	# so that no rank compiles it while another loads it.
	$(BIN)/python -c 'from pipeline.train.engine import build_cpu_ops; build_cpu_ops()'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline demo

# Style, then the layering: import-linter's contracts in pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Test tiers, by pytest marker. The fast tier (unit tests and the 2-process gloo tests, about
# 2 minutes on 2 idle cores) is the edit loop; the slow tier is the rest: end-to-end runs of
# the CLI, DeepSpeed training in several processes, a real Slurm, a real MLflow server, a
# multi-host cluster. Between them they hold every test exactly once.
SLOW_MARKERS := slow or slurm or mlflow_server or multinode
PYTEST := $(BIN)/python -m pytest
TIMED := .ci/timed

test-fast: $(STAMP)
	$(TIMED) fast $(PYTEST) -m "not ($(SLOW_MARKERS))"

test-slow: $(STAMP)
	$(TIMED) slow $(PYTEST) -m "$(SLOW_MARKERS)"

# Everything (the README's one command, and CI's): lint, then both tiers; a failing tier does
# not hide the other's result, and each tier's wall time is printed, again at the end.
test: $(STAMP)
	@log=$$(mktemp); rc=0; \
	TIER_LOG=$$log $(TIMED) lint $(MAKE) --no-print-directory lint || rc=1; \
	TIER_LOG=$$log $(TIMED) fast $(PYTEST) -m "not ($(SLOW_MARKERS))" || rc=1; \
	TIER_LOG=$$log $(TIMED) slow $(PYTEST) -m "$(SLOW_MARKERS)" || rc=1; \
	echo "== wall time per tier"; cat $$log; rm -f $$log; exit $$rc

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
