#!/usr/bin/env bash
# The default test suite: offline, no real weights, a few minutes on 2 cores.
# Real-model tests are opt-in: EDGELLM_SLOW=1 scripts/test.sh -m slow (see scripts/bench.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh export,serve,ray,dev
exec .venv/bin/python -m pytest -q "$@"
