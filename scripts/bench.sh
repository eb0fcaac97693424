#!/usr/bin/env bash
# Benchmarks on the real pair: runs the main job's set-up (cached), the opt-in slow tests, then
# `edgellm bench` on benchmarks/prompts. The last stdout line is one JSON document.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh export,serve,dev,bench
cache="${EDGELLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgellm}"
.venv/bin/edgellm demo --max-new-tokens 32 >&2
EDGELLM_SLOW=1 .venv/bin/python -m pytest -q -m slow tests/slow >&2
cat benchmarks/prompts/code.jsonl benchmarks/prompts/edit.jsonl benchmarks/prompts/chat.jsonl > "$cache/all_prompts.jsonl"
exec .venv/bin/edgellm bench "$cache/bundles/qwen2.5-coder-1.5b-q4km+0.5b-int4" --prompts "$cache/all_prompts.jsonl" \
  --repeats "${REPEATS:-3}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" "$@"
