# Two commands: `make distill` (the embedded default, end to end) and `make test` (the default test tier).
# Both build the virtual environment from requirements.lock on first use. VENV can point elsewhere: CI keys a
# reusable venv by the lock's hash (.ci/run), while a fresh machine builds .venv from scratch.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
LOCK_HASH := $(shell cat requirements.lock | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
# Every run names its 20 slowest tests: the default tier's budget is ~15 minutes on 2 cores.
PYTEST_ARGS ?= --durations=20
RUN := env PYTHONPATH=$(CURDIR) RAY_AUTH_MODE=disabled $(VENV)/bin/python

.PHONY: venv distill smoke test test-all clean

venv: $(STAMP)

# No prerequisite on purpose: the stamp's name carries the lock's hash, and a fresh clone's file times would
# otherwise make a cached venv look stale.
$(STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.lock
	touch $(STAMP)

distill: $(STAMP)
	$(RUN) jobs/distill.py $(ARGS)

smoke: $(STAMP)
	$(RUN) jobs/distill.py --smoke-test

test: $(STAMP)
	$(RUN) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(RUN) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
