# llava-train developer entry points. `make install` builds .venv/ from requirements-lock.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline

.PHONY: install test test-fast lint demo clean

install: $(STAMP)

# torch first and pinned: the CPU wheel lies on local disk; letting pip resolve torch through
# another package would pull a multi-GB CUDA build.
$(STAMP): requirements-lock.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-lock.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests -q

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow and not distributed"

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

demo: install
	$(BIN)/llava-train demo --workdir runs/demo

clean:
	rm -rf $(VENV) .cache runs
