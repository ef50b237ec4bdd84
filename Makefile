# bertswarm: every target sets itself up on a fresh machine (creates or refreshes .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_PEERS ?= 3
DEMO_SECONDS ?= 180
MONITOR_LISTEN ?= 127.0.0.1:9090

.PHONY: setup demo monitor test test-fast lint format bench clean faults soak

setup: $(VENV)/.installed

# CPU machines get torch's CPU wheel (small, no CUDA download); machines with an NVIDIA GPU get the default build.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q 'torch>=2.4'; \
	else \
		$(PY) -m pip install -q torch==2.13.0 || \
		$(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m coordinator.demo --peers $(DEMO_PEERS) --seconds $(DEMO_SECONDS) --workdir demo-state

# Prometheus (Debian's prometheus package) scraping make demo's swarm; run make demo in another terminal
monitor: setup
	$(PY) -m monitoring.local --peers $(DEMO_PEERS) --listen $(MONITOR_LISTEN)

test: setup
	$(PY) -m ruff check peer coordinator serve monitoring tests tools bench
	$(PY) -m ruff format --check peer coordinator serve monitoring tests tools bench
	$(PY) -m pytest $(PYTEST_ARGS)

# The developer's inner loop (about 3 minutes on 2 cores): lint, the unit tests, and the two-peer test that checks the
# product's Trainer against a single process. make test stays the full suite that CI runs.
test-fast: setup
	$(PY) -m ruff check peer coordinator serve monitoring tests tools bench
	$(PY) -m pytest tests/unit tests/integration/test_equivalence.py $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check peer coordinator serve monitoring tests tools bench

format: setup
	$(PY) -m ruff format peer coordinator serve monitoring tests tools bench

# Side-by-side benchmarks (swarm vs single process vs DDP): bench/results/*.json and docs/performance.md.
# BENCH_ARGS='--quick' for a smoke run, BENCH_ARGS='--only throughput' for one scenario.
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# Fault suite (tests/faults): every scenario FAULTS_REPEAT times on a live swarm -> docs/reliability.md (+ .json).
FAULTS_REPEAT ?= 20
FAULTS_ARGS ?=
faults: setup
	$(PY) -m tests.faults --repeat $(FAULTS_REPEAT) $(FAULTS_ARGS)

# Soak (not in CI): 4 peers, one killed and restarted every 2 min, then a no-churn run of the same length.
SOAK_MINUTES ?= 30
soak: setup
	$(PY) -m tests.faults.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) demo-state .pytest_cache .ruff_cache
