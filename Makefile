# The two commands a fresh machine needs: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-dualfocus

.PHONY: help install test-tools models serve test test-fast eval bench soak docker clean

help:
	@echo "make serve   set up, build the default tiny model if missing, and serve it on 127.0.0.1:8000"
	@echo "make test    set up, then run the whole test suite"
	@echo "make models  build the embedded tiny checkpoints (prints NAME PATH)"
	@echo "make eval    the generated zoom-in task, macro vs DualFocus, on tiny-dualfocus (docs/paper.md; ~10 min)"
	@echo "make bench   this service vs stock vLLM vs the reference's way (docs/benchmarks.md)"
	@echo "make soak    2 minutes at 4x the sustainable rate: stays up, refuses politely (docs/reliability.md)"
	@echo "make docker  build the image dualfocus-serve:cpu (VARIANT=gpu: CUDA; needs a Docker engine; docs/deploy.md)"

install:
	@bash deploy/install.sh

models: install
	$(PY) -m engine.cli build-tiny

# Tools the tests use beside the Python packages: promtool (Debian's prometheus package).
test-tools:
	@command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus package for promtool" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

serve: install
	$(PY) -m engine.cli build-tiny $(MODEL)
	$(PY) -m engine.cli serve --model $(MODEL) $(SERVE_FLAGS)

test: install test-tools
	$(PY) -m pytest -q -ra

# Everything that needs no vLLM engine (seconds, not minutes).
test-fast: install
	$(PY) -m pytest -q -ra -m "not engine"

# Macro vs DualFocus on 400 generated test questions of the task tiny-dualfocus is trained on (training/README.md).
eval: install
	$(PY) -m training.evaluate --model $(MODEL) --questions 400 --out eval-out

# The side-by-side benchmark (about 10 minutes): results in loadtests/results/, table in docs/benchmarks.md.
bench: install
	$(PY) -m loadtests.bench

# Overload for 2 minutes at 4x the sustainable rate (not in `make test`): docs/reliability.md.
soak: install
	$(PY) -m loadtests.soak --factor 4 --duration 120

# The service as an image, installed by deploy/install.sh like `make` (docs/deploy.md). Needs a
# Docker engine with BuildKit, which the machines this project is developed on do not run.
docker: VARIANT ?= cpu
docker:
	docker build --build-arg VARIANT=$(VARIANT) -t dualfocus-serve:$(VARIANT) .

clean:
	rm -rf $(VENV) .pytest_cache
