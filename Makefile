# make test / make demo: each creates or updates .venv on a fresh machine, from requirements.lock only
# (exact versions, hashes checked, nothing resolved at install time). After editing a dependency in
# pyproject.toml or requirements-*.txt, run `make lock` and commit requirements.lock. See docs/install.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# this tree's projects, editable; their dependencies all come from the lock
LOCAL := -e . -e integrations/llama-index-llms-gist-memory -e integrations/llama-index-retrievers-gist-memory \
	-e integrations/langchain-gist-memory
# the resolver behind `make lock` (only `make lock` needs it; installs need pip alone)
UV_VERSION := 0.13.8
UV := $(VENV)/.uv/bin/uv
# torch's OpenMP threads spin while waiting; on a small shared machine that starves everything else
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-fast demo lint bench clean lock lock-upgrade kvpress-env

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml $(wildcard integrations/*/pyproject.toml) constraints.txt requirements-extra.txt \
		requirements-nodeps.txt .ci/lock.py Makefile
	$(PY) .ci/lock.py check
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# --no-deps: the lock is complete (torch==2.13.0+cpu included, so no CUDA wheels are ever pulled in)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation $(LOCAL)
	$(BIN)/python .ci/lock.py verify $(BIN)/python
	@# the web app's browser test drives Debian's Chromium (never `playwright install`); root on apt systems only
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt) for the browser test"; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "note: could not install chromium; the browser test will be skipped"; fi
	@# the Redis backend's tests start Debian's redis-server themselves (skipped with a reason when it is missing)
	@if ! command -v redis-server >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing redis-server (apt) for the Redis backend tests"; \
	  apt-get install -y -q redis-server >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1) || \
	  echo "note: could not install redis-server; the Redis backend tests will be skipped"; fi
	touch $(STAMP)

# regenerate requirements.lock from pyproject.toml + requirements-*.txt + constraints.txt, keeping every pin that
# still fits; lock-upgrade moves everything to the newest versions the bounds allow
lock: $(UV)
	UV=$(UV) $(PY) .ci/lock.py compile

lock-upgrade: $(UV)
	UV=$(UV) $(PY) .ci/lock.py compile --upgrade

$(UV):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --target $(VENV)/.uv uv==$(UV_VERSION)

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv
	$(BIN)/python -m gist_memory.demo

lint: venv
	$(BIN)/ruff check gist_memory tests integrations examples

# NVIDIA's kvpress for the peer comparison (python -m gist_memory.eval.peers): it pins transformers<5.3, so it
# gets its own environment, called as a subprocess; nothing else needs it
KVPRESS_VENV ?= .venv-kvpress
kvpress-env: $(KVPRESS_VENV)/bin/python

$(KVPRESS_VENV)/bin/python:
	$(PY) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(KVPRESS_VENV)/bin/python -m pip install -q -c constraints.txt kvpress==0.5.5 "transformers<5.3"

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) .pytest_cache
