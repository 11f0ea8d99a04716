# transformers-deepseek: build / test entry points. README and CI call only `make demo` and `make test`.
#
# Every target builds its own virtualenv inside the repo, one per transformers version (.venv-tf<version>/).
# torch is installed first, pinned, on its own: letting pip resolve an unpinned torch would pull a multi-GB
# CUDA build. The second install passes the same torch pin again so pip can never swap it.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# Newest release with a native deepseek_v4, and newest release without one.
TRANSFORMERS_VERSIONS ?= 5.23.0 5.7.0
DEFAULT_TRANSFORMERS ?= $(firstword $(TRANSFORMERS_VERSIONS))
PIP_FLAGS ?= --quiet --progress-bar off
PYTEST_ARGS ?=

venv = .venv-tf$(1)
DEFAULT_VENV := $(call venv,$(DEFAULT_TRANSFORMERS))
STAMPS := $(foreach v,$(TRANSFORMERS_VERSIONS),$(call venv,$(v))/.installed)
LINT_PATHS := $(wildcard src tests bench examples)

.PHONY: help setup demo test bench style quality clean

help:
	@echo "make setup    create .venv-tf<v>/ for each of TRANSFORMERS_VERSIONS ($(TRANSFORMERS_VERSIONS))"
	@echo "make demo     run python -m transformers_deepseek.demo (transformers $(DEFAULT_TRANSFORMERS))"
	@echo "make test     run the full pytest suite once per transformers version; fails if any fails"
	@echo "make bench    run bench/parity.py (transformers $(DEFAULT_TRANSFORMERS))"
	@echo "make style    ruff format + ruff check --fix"
	@echo "make quality  ruff format --check + ruff check (no changes)"
	@echo "make clean    remove the venvs and caches"

setup: $(STAMPS)

# One venv per transformers version. Rebuilt (in place) when the package metadata changes.
.venv-tf%/.installed: setup.cfg pyproject.toml
	@echo "==> setting up $(call venv,$*) (torch==$(TORCH_VERSION), transformers==$*)"
	@test -x $(call venv,$*)/bin/python || $(PYTHON) -m venv $(call venv,$*)
	$(call venv,$*)/bin/python -m pip install $(PIP_FLAGS) "torch==$(TORCH_VERSION)"
	$(call venv,$*)/bin/python -m pip install $(PIP_FLAGS) -e ".[test]" "transformers==$*" "torch==$(TORCH_VERSION)"
	@$(call venv,$*)/bin/python -c "import torch, transformers; print('    torch', torch.__version__, '| transformers', transformers.__version__)"
	@touch $@

# ruff (and mypy) only in the default venv.
$(DEFAULT_VENV)/.dev-installed: $(DEFAULT_VENV)/.installed
	$(DEFAULT_VENV)/bin/python -m pip install $(PIP_FLAGS) -e ".[test,dev]" "transformers==$(DEFAULT_TRANSFORMERS)" "torch==$(TORCH_VERSION)"
	@touch $@

.PRECIOUS: .venv-tf%/.installed

demo: $(DEFAULT_VENV)/.installed
	$(DEFAULT_VENV)/bin/python -m transformers_deepseek.demo

# pytest exit code 5 (nothing collected) is non-zero, so it fails like any other failure.
test: $(STAMPS)
	@failed=""; \
	for v in $(TRANSFORMERS_VERSIONS); do \
	  echo; \
	  echo "================================================================================"; \
	  echo "== pytest on transformers==$$v  ($(call venv,$$v))"; \
	  echo "================================================================================"; \
	  rc=0; $(call venv,$$v)/bin/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "!! transformers==$$v: pytest collected no tests (exit 5)"; fi; \
	  if [ $$rc -ne 0 ]; then failed="$$failed $$v(exit $$rc)"; fi; \
	done; \
	echo; \
	if [ -n "$$failed" ]; then echo "== make test: FAILED on transformers:$$failed"; exit 1; fi; \
	echo "== make test: passed on transformers $(TRANSFORMERS_VERSIONS)"

bench: $(DEFAULT_VENV)/.installed
	$(DEFAULT_VENV)/bin/python bench/parity.py

style: $(DEFAULT_VENV)/.dev-installed
	$(DEFAULT_VENV)/bin/ruff format $(LINT_PATHS)
	$(DEFAULT_VENV)/bin/ruff check --fix $(LINT_PATHS)

# Report both format and lint problems before failing.
quality: $(DEFAULT_VENV)/.dev-installed
	@rc=0; \
	$(DEFAULT_VENV)/bin/ruff format --check $(LINT_PATHS) || rc=1; \
	$(DEFAULT_VENV)/bin/ruff check $(LINT_PATHS) || rc=1; \
	exit $$rc

clean:
	rm -rf .venv-tf*/ build/ dist/ src/*.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
