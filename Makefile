# llava-train developer entry points. `make install` builds .venv/ from requirements-lock.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline

.PHONY: install lmms-eval-env test test-fast lint demo clean

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

# lmms-eval lives in its own environment (principle 11: evaluation is a client, run as a separate process);
# point `eval.lmms_python` at $(LMMS_VENV)/bin/python. Same CPU torch wheel first, then the lock with --no-deps:
# lmms-eval's own requirements name torchvision, which pip would resolve to a CUDA torch.
LMMS_VENV := .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.installed

lmms-eval-env: $(LMMS_STAMP)

$(LMMS_STAMP): requirements-lmms-lock.txt
	test -d $(LMMS_VENV) || $(PY) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install -q --upgrade pip
	$(LMMS_VENV)/bin/pip install -q torch==2.13.0
	$(LMMS_VENV)/bin/pip install -q --no-deps -r requirements-lmms-lock.txt
	$(LMMS_VENV)/bin/python -m lmms_eval eval --help > /dev/null
	touch $(LMMS_STAMP)

# The real-lmms-eval tests fail (never skip) when LLAVA_TRAIN_LMMS_PYTHON names no working environment.
test: install lmms-eval-env
	LLAVA_TRAIN_LMMS_PYTHON=$(CURDIR)/$(LMMS_VENV)/bin/python $(BIN)/python -m pytest tests -q

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow and not distributed"

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

demo: install
	$(BIN)/llava-train demo --workdir runs/demo

clean:
	rm -rf $(VENV) $(LMMS_VENV) .cache runs
