# DualFocus Serve. CPU image by default; `--build-arg VARIANT=gpu` installs the ordinary vllm
# (CUDA) instead. Installs from the same pinned files as `make` (deploy/install.sh).
#   docker build -t dualfocus-serve .
#   docker run -p 8000:8000 dualfocus-serve                       # the embedded tiny-llava
#   docker run -p 8000:8000 -v /models/llava:/model -e DUALFOCUS_MODEL=/model dualfocus-serve
FROM python:3.11-slim-bookworm

ARG VARIANT=cpu
ENV DUALFOCUS_VARIANT=${VARIANT} \
    PYTHON=/usr/local/bin/python3.11 \
    PATH=/app/.venv/bin:$PATH \
    DUALFOCUS_CACHE=/home/dualfocus/.cache/dualfocus \
    DUALFOCUS_MODEL=tiny-llava \
    DUALFOCUS_PORT=8000

RUN useradd --create-home --uid 10001 dualfocus
WORKDIR /app
COPY --chown=dualfocus:dualfocus . /app
USER dualfocus
RUN bash deploy/install.sh && dualfocus build-tiny tiny-llava

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"DUALFOCUS_PORT\"]}/health', timeout=4)"
# Further flags (--api-key, --max-model-len, --kv-cache-gib, ...) go after the image name.
ENTRYPOINT ["sh", "-c", "exec dualfocus serve --host 0.0.0.0 --port \"$DUALFOCUS_PORT\" --model \"$DUALFOCUS_MODEL\" \"$@\"", "--"]
