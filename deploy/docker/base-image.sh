#!/usr/bin/env bash
# A Debian bookworm image with python3.11 (and its headers), made on this machine: for machines that reach Debian's
# packages but no image registry (the Dockerfile's default base, python:3.11-slim-bookworm, comes
# from one). debootstrap, then `docker import`; about a minute.
#   bash deploy/docker/base-image.sh [IMAGE]      # default dualfocus-local/python:3.11-bookworm
#   make docker BASE_IMAGE=dualfocus-local/python:3.11-bookworm
# Does nothing when IMAGE exists. Needs root and Debian's debootstrap; DEBIAN_MIRROR picks the
# mirror (default: debootstrap's own). DOCKER picks the docker CLI.
set -euo pipefail

IMAGE=${1:-dualfocus-local/python:3.11-bookworm}
DOCKER=${DOCKER:-docker}

if $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

root=$(mktemp -d /tmp/dualfocus-base.XXXXXX)
trap 'rm -rf "$root" "$root.log"' EXIT
chmod 755 "$root"  # mktemp made it 0700, and it becomes the image's /
echo "base-image.sh: debootstrap bookworm into $root" >&2
# python3-venv: `python3 -m venv` (ensurepip), which deploy/install.sh uses. python3-dev: Python.h,
# which the official python images have too and torch's inductor includes in the kernels it compiles.
if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-dev bookworm "$root" ${DEBIAN_MIRROR:-} \
     >"$root.log" 2>&1; then
  tail -n 20 "$root.log" >&2
  exit 1
fi
# What an image does not need: downloaded packages, package lists (a Dockerfile runs apt-get
# update itself), docs, man pages, translations.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" -c . | $DOCKER import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "base-image.sh: made $IMAGE ($($DOCKER image inspect -f '{{.Size}}' "$IMAGE") bytes)" >&2
