# The README's two commands.
#   make demo   set up a fresh machine and run AEGIS on the embedded tiny Phi-3: train the quickstart, export it to
#               GGUF, then serve the OpenAI-compatible API (127.0.0.1:8000) and the chat page (127.0.0.1:7860)
#   make test   the same set-up, then the test suite (CI's .ci/run calls this)
#   make lint   ruff's checks (CI runs them before the tests; docs/development.md)
# Run again, each step picks up where it stopped: the venv is kept, train resumes (a finished run returns at once),
# export reuses what is up to date. docs/setup.md lists the commands one by one.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/quickstart
TRAINED := $(RUN)/export/quickstart-q8_0.gguf
BASE := $(RUN)/export-base/base-f16.gguf

.PHONY: demo test lint setup train export serve

demo: serve

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

setup: $(VENV)/.installed

# Every release comes from requirements.lock (docs/development.md), as in CI and the images. torch first, so pip
# takes its CPU build where one is at hand; llama-cpp-python compiles llama.cpp on its first install.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c requirements.lock torch
	$(VENV)/bin/pip install -c requirements.lock -e '.[all]'
	touch $@

train: setup
	$(PY) -m train --config configs/quickstart.toml --run-dir $(RUN) --resume

export: train
	$(PY) -m export all --run $(RUN)

# the untrained embedded model as a GGUF too, for the chat page's Compare tab
$(BASE): | setup
	$(PY) -m export gguf --model "$$($(PY) -m aegis.tiny)" --out $@ --type f16

# the trained model first, then the untrained base as `base`: the chat page chats with the trained model and
# offers `base` in Compare
serve: export $(BASE)
	$(PY) -m serve --model $(TRAINED) --model base=$(BASE) & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT; \
	$(PY) -m serve.ui --api http://127.0.0.1:8000/v1 --runs runs
