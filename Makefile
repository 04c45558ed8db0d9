# The two commands a fresh machine needs: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-dualfocus

.PHONY: help install test-tools models serve lint test test-fast eval bench bench-bigimages soak fleet fleet-bench fleet-fault docker docker-tools docker-test clean

help:
	@echo "make serve   set up, build the default tiny model if missing, and serve it on 127.0.0.1:8000"
	@echo "make test    set up, then run the whole test suite (after make lint)"
	@echo "make lint    ruff lint on engine/ server/ clients/ loadtests/ tests/; ruff format and mypy on the first three"
	@echo "make test-fast  the tests that need no vLLM engine (seconds)"
	@echo "make models  build the embedded tiny checkpoints (prints NAME PATH)"
	@echo "make eval    the generated zoom-in task, macro vs DualFocus, on tiny-dualfocus (docs/paper.md; ~10 min)"
	@echo "make bench   this service vs stock vLLM vs the reference's way, tiny and compute-bound model shapes (docs/benchmarks.md)"
	@echo "make bench-bigimages  small streams' time to first token beside 35-megapixel JPEGs, vs stock vLLM"
	@echo "make soak    2 minutes at 4x the sustainable rate: stays up, refuses politely (docs/reliability.md)"
	@echo "make fleet   REPLICAS=2 POLICY=sticky_least_loaded: replicas behind vllm-router on 127.0.0.1:8000 (docs/deploy.md)"
	@echo "make fleet-bench  cached share and throughput by router policy (docs/benchmarks.md)"
	@echo "make fleet-fault  a replica killed under load behind the router (docs/reliability.md)"
	@echo "make docker-test  build the image and run it: answers, metrics, drains, no build secrets (docs/deploy.md)"
	@echo "make docker  build the image dualfocus-serve:cpu (VARIANT=gpu: CUDA; needs a Docker engine; docs/deploy.md)"

install:
	@bash deploy/install.sh

models: install
	$(PY) -m clients build-tiny

# Tools the tests use beside the Python packages: promtool and a Prometheus server (Debian's
# prometheus package), the Compose tool that checks deploy/compose.yaml (Debian's docker-compose).
test-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v docker-compose >/dev/null || { \
	  echo "installing Debian's prometheus and docker-compose packages" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus docker-compose >/dev/null; }

serve: install
	$(PY) -m clients build-tiny $(MODEL)
	$(PY) -m clients serve --model $(MODEL) $(SERVE_FLAGS)

# ruff's lint on the packages and the code that tests them; its format and mypy on the
# packages. Configured in pyproject.toml.
PACKAGES := engine server clients
LINTED := $(PACKAGES) loadtests tests
lint: install
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(PACKAGES)
	$(PY) -m mypy

test: install test-tools lint
	$(PY) -m pytest -q -ra

# Everything that needs no vLLM engine: no in-process engine, no server subprocess (seconds, not minutes).
test-fast: install
	$(PY) -m pytest -q -ra -m "not engine and not server"

# Macro vs DualFocus on 400 generated test questions of the task tiny-dualfocus is trained on (training/README.md).
eval: install
	$(PY) -m training.evaluate --model $(MODEL) --questions 400 --out eval-out

# The side-by-side benchmark at two model shapes (about 10 minutes at tiny-llava, 20 at bench-llava-576, which it
# builds on first use): results in loadtests/results/, tables in docs/benchmarks.md. One shape: BENCH_FLAGS="--shapes compute".
bench: install
	$(PY) -m loadtests.bench $(BENCH_FLAGS)

# Small streams beside big images (about 10 minutes): its own section of docs/benchmarks.md.
bench-bigimages: install
	$(PY) -m loadtests.bigimages

# Overload for 2 minutes at 4x the sustainable rate (not in `make test`): docs/reliability.md.
soak: install
	$(PY) -m loadtests.soak --factor 4 --duration 120

# Several replicas behind the vLLM project's router on this machine (docs/deploy.md, "Many replicas").
# Ctrl-C stops the router and the replicas. More `dualfocus serve` flags: FLEET_FLAGS.
REPLICAS ?= 2
POLICY ?= sticky_least_loaded
FLEET_FLAGS ?= --kv-cache-gib 1
fleet: install
	$(PY) -m loadtests.fleet --replicas $(REPLICAS) --policy $(POLICY) --model $(MODEL) -- $(FLEET_FLAGS)

# Cached share and throughput by router policy, one replica alone as the reference (about 10 minutes).
fleet-bench: install
	$(PY) -m loadtests.fleet_bench

# A replica killed under load and started again, behind the router (a few minutes; not in `make test`).
fleet-fault: install
	$(PY) -m loadtests.fleet_fault

# The service as an image, installed by deploy/install.sh like `make` (docs/deploy.md). Needs a
# Docker engine with BuildKit. BASE_IMAGE: another base than python:3.11-slim-bookworm (where no
# image registry is reachable: deploy/docker/base-image.sh); DOCKER_BUILD_FLAGS: more `docker build`
# flags (--secret, --network host); DOCKER: the docker CLI.
DOCKER ?= docker
docker: VARIANT ?= cpu
docker:
	DOCKER_BUILDKIT=1 $(DOCKER) build --build-arg VARIANT=$(VARIANT) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	  $(DOCKER_BUILD_FLAGS) -t dualfocus-serve:$(VARIANT) .

# Docker's engine (Debian's docker.io; dockerd runs without systemd) and debootstrap for a local base
# image: what `make docker-test` needs beside the test tools (.ci/run installs them).
docker-tools:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { \
	  echo "installing Debian's docker.io and debootstrap packages" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    docker.io debootstrap >/dev/null; }

# The image built with `make docker` and run: answers, metrics, non-root, drains on SIGTERM, no build
# secrets in any layer (tests/test_image.py, also part of `make test` when a Docker engine can be
# started). Starts dockerd if none runs and stops it after.
docker-test: install test-tools docker-tools
	$(PY) -m pytest -q -ra tests/test_image.py

clean:
	rm -rf $(VENV) .pytest_cache
