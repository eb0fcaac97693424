#!/usr/bin/env bash
# The execution-provider tests that need an optional onnxruntime build, each in its own
# environment under .eps/ (onnxruntime-openvino replaces onnxruntime; onnxruntime-qnn is a plugin
# for the stock one): tests/runtime/test_openvino.py and tests/runtime/test_qnn.py. The default
# test run skips them. Usage: scripts/test_eps.sh [openvino] [qnn]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
eps=("${@:-openvino qnn}")
for ep in ${eps[@]}; do
  case "$ep" in
    openvino) pkgs="onnxruntime-openvino==1.24.1"; test=tests/runtime/test_openvino.py ;;
    qnn) pkgs="onnxruntime==1.32.0 onnxruntime-qnn==2.7.0"; test=tests/runtime/test_qnn.py ;;
    *) echo "unknown provider '$ep'; allowed: openvino, qnn" >&2; exit 2 ;;
  esac
  env=".eps/$ep"
  if [ ! -x "$env/bin/python" ]; then
    python3 -m venv "$env"
    # torch only builds the tiny test models: pinned like scripts/setup_env.sh (the CPU wheel on disk)
    "$env/bin/pip" install -q "torch==2.13.0"
    "$env/bin/pip" install -q $pkgs "transformers==4.57.6" safetensors pytest numpy tokenizers click jinja2 onnx onnx-ir
    "$env/bin/pip" install -q --no-deps -e .
  fi
  echo "== $ep: $test"
  "$env/bin/python" -m pytest -q -p no:cacheprovider "$test"
done
