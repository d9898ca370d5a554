# One command to set up and run the course's main job, one to set up and run every test.
#   make demo   create .venv/ if missing, install, run `ldm-course demo`
#   make test   create .venv/ if missing, install, run all notebooks (nbdev_test, ci scale) + pytest + docs check
# torch is pinned here, not in settings.ini (Colab and other users bring their own build); override with
#   make test TORCH_SPEC="torch torchvision"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# offline copies of the datasets, when this checkout sits beside ../shared (CI, maintainers)
SHARED_DATA := $(wildcard ../shared/data)
TEST_ENV := LDM_COURSE_SCALE=ci HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg $(if $(SHARED_DATA),LDM_COURSE_DATA=$(abspath $(SHARED_DATA)),)
NB_WORKERS ?= 2

.PHONY: setup demo test test-nbs test-py docs-check docs export execute

$(BIN)/.installed: settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/ldm-course demo --out out

test: setup
	@echo "== notebooks (nbdev_test, LDM_COURSE_SCALE=ci$(if $(SHARED_DATA),, no ../shared/data: bundled-MNIST fallback)) =="
	$(TEST_ENV) OMP_NUM_THREADS=1 $(BIN)/nbdev_test --timing --n_workers $(NB_WORKERS)
	@echo "== pytest =="
	$(TEST_ENV) OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -q
	@echo "== docs check =="
	$(TEST_ENV) $(BIN)/python tools/docs_check.py

test-nbs: setup
	$(TEST_ENV) OMP_NUM_THREADS=1 $(BIN)/nbdev_test --timing --n_workers $(NB_WORKERS)

test-py: setup
	$(TEST_ENV) OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -q

docs-check: setup
	$(TEST_ENV) $(BIN)/python tools/docs_check.py

# run notebooks in place so their outputs (figures, tables) are committed for the docs:
#   make execute SCALE=cpu NBS="nbs/02_schedules.ipynb nbs/07_samplers.ipynb"
SCALE ?= cpu
NBS ?= $(wildcard nbs/*.ipynb)
execute: setup
	for nb in $(NBS); do echo "== $$nb ($(SCALE))"; (cd nbs && OMP_NUM_THREADS=1 LDM_COURSE_SCALE=$(SCALE) MPLBACKEND=module://matplotlib_inline.backend_inline $(if $(SHARED_DATA),LDM_COURSE_DATA=$(abspath $(SHARED_DATA)),) ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=3600 $$(basename $$nb)) || exit 1; done
	$(BIN)/nbdev_clean

# the real docs site (needs Quarto: https://quarto.org)
docs: setup
	$(BIN)/nbdev_docs

export: setup
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(BIN)/python tools/make_readme.py
