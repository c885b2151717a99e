# `make test` sets up everything on a fresh machine: .venv, pinned installs, then the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test test-slow bench bench-counterfactual bench-gradindex demo lint clean

$(STAMP): pyproject.toml requirements/main.txt requirements/dev.txt requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -c requirements/constraints.txt -r requirements/main.txt -r requirements/dev.txt
	# kronfluence declares torchvision, which cannot load beside this torch: install without deps.
	$(PIP_INSTALL) --no-deps kronfluence==1.0.1
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser test of the Space (Playwright drives it; no browser download).
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

BENCH_SCRIPTS := fit_bench fit_memory score_bench query_rank_accuracy queries_bench retrieval_bench scale accuracy fact_tracing fact_tracing_demo counterfactual gradindex_bench report

# Every benchmark writes bench/out/<name>.json; report.py turns them into docs/benchmarks.md.
# (bench/gpu_check.py is not here: it needs a CUDA machine.)
bench: $(STAMP)
	@for s in $(BENCH_SCRIPTS); do test -f bench/$$s.py || { echo "make bench: bench/$$s.py is missing" >&2; exit 1; }; done
	$(BIN)/python -m bench.fit_bench
	$(BIN)/python -m bench.fit_memory
	$(BIN)/python -m bench.score_bench --query-ranks 2,8,32
	$(BIN)/python -m bench.query_rank_accuracy
	$(BIN)/python -m bench.queries_bench
	$(BIN)/python -m bench.retrieval_bench
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.accuracy --hidden 32 --ffn 128 --fit-sequences 200 --candidates 500 --queries 10 --damping-ratio 1.0 --cg-time-limit 1500 --cg-max-iter 1000
	$(BIN)/python -m bench.fact_tracing
	$(BIN)/python -m bench.fact_tracing_demo
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.counterfactual --workers 2
	$(BIN)/python -m bench.gradindex_bench
	$(BIN)/python -m bench.report

# Multi-stage LDS and top-k removal on two fact worlds (issue 11): trains ~280 tiny model pairs on
# 2 worker processes; every pair is cached under ~/.cache/hub_msif/bench/counterfactual, so a rerun
# (or `make bench` afterwards) resumes or only reads the cache. Rewrites its section of docs/benchmarks.md.
bench-counterfactual: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.counterfactual --workers 2
	$(BIN)/python -m bench.report --only counterfactual

# The gradient index (issue 18): recall and MRR on both fact worlds, the build against a plain pass, search
# latency over 1M synthetic documents, scale on paper -> bench/out/gradindex.json and its section of
# docs/benchmarks.md. Needs about 12 GB of memory for the 1M-document point.
bench-gradindex: $(STAMP)
	$(BIN)/python -m bench.gradindex_bench
	$(BIN)/python -m bench.report --only gradindex

demo: $(STAMP)
	$(BIN)/hub-msif demo

lint: $(STAMP)
	$(BIN)/ruff check hub_msif tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
