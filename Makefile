# The two commands a fresh machine needs: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-llava

.PHONY: help install models serve test test-fast clean

help:
	@echo "make serve   set up, build the default tiny model if missing, and run it"
	@echo "make test    set up, then run the whole test suite"
	@echo "make models  build the embedded tiny checkpoints (prints NAME PATH)"

install:
	@bash deploy/install.sh

models: install
	$(PY) -m engine.cli build-tiny

# Until the HTTP server lands (issue 3) this answers one question through the engine
# in-process and prints the trace.
serve: install
	$(PY) -m engine.cli build-tiny $(MODEL)
	$(PY) -m engine.cli demo --model $(MODEL)

test: install
	$(PY) -m pytest -q -ra

# Everything that needs no vLLM engine (seconds, not minutes).
test-fast: install
	$(PY) -m pytest -q -ra -m "not engine"

clean:
	rm -rf $(VENV) .pytest_cache
