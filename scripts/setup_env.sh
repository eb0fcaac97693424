#!/usr/bin/env bash
# Create .venv (once) and install edgellm with the extras named in $1 (e.g. "export,dev").
# torch is pinned to 2.13.0: on these machines pip takes the CPU wheel from /opt/wheels; never
# let a resolver pull a CUDA build. pip's output goes to .venv/install.log (shown on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.edgellm-installed-${extras//,/-}-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "installing edgellm[$extras] into .venv (log: .venv/install.log)" >&2
  pip="$PWD/.venv/bin/python -m pip --disable-pip-version-check"
  { $pip install --upgrade pip && $pip install "torch==2.13.0" && $pip install -e ".[$extras]"; } \
    > .venv/install.log 2>&1 || { tail -40 .venv/install.log >&2; exit 1; }
  .venv/bin/python -c "import edgellm, onnxruntime"  # fail loudly if the install did not work
  touch "$stamp"
fi
