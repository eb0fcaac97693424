#!/usr/bin/env bash
# Create .venv (once) and install edgellm with the extras named in $1 (e.g. "export,dev").
# torch is pinned to 2.13.0: on these machines pip takes the CPU wheel from /opt/wheels; never
# let a resolver pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.edgellm-installed-$extras-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import edgellm, onnxruntime" # fail loudly if the install did not work
  touch "$stamp"
fi
