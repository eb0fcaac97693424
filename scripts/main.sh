#!/usr/bin/env bash
# The main job: set up, fetch the default pair, export the int4 bundle, generate with speculative
# decoding and print the speedup. Extra arguments go to `edgellm demo` (try --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh export,serve
exec .venv/bin/edgellm demo "$@"
