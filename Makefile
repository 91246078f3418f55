# Two entry points that do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench setup

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The main job on bundled defaults: every method on the same task, a table, results.json and
# report.html in runs/compare/ (rerunning replaces only deltatune's own files there).
demo: setup
	$(BIN)/deltatune compare --output runs/compare --overwrite

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/lora_vs_peft.py
