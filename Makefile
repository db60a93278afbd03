# Two commands on a fresh machine:
#   make demo   set up .venv and run the end-to-end demo on the bundled data
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/gct-surgery demo --out demo-out --force  # 3 seeds, ~2 min; --force: replaces an earlier demo only

test: $(STAMP)  # two test processes: each test uses one torch thread (tests/conftest.py)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" -n 2 --dist worksteal

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_gate.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_inference.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_stages.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_startup.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_finetune_speed.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
