# make test / make demo: each creates or updates .venv on a fresh machine (torch pinned first: see shared OFFLINE.md)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -c constraints.txt
# torch's OpenMP threads spin while waiting; on a small shared machine that starves everything else
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-fast demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(PIP) -q -e '.[llama-index,langchain,dev]'
	$(PIP) -q -e integrations/llama-index-retrievers-gist-memory -e integrations/llama-index-llms-gist-memory
	$(PIP) -q -e 'integrations/langchain-gist-memory[test]'
	$(PIP) -q -r requirements-extra.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	@# the web app's browser test drives Debian's Chromium (never `playwright install`); root on apt systems only
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt) for the browser test"; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "note: could not install chromium; the browser test will be skipped"; fi
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv
	$(BIN)/python -m gist_memory.demo

lint: venv
	$(BIN)/ruff check gist_memory tests integrations examples

clean:
	rm -rf $(VENV) .pytest_cache
