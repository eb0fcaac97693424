#!/usr/bin/env bash
# Set up the engines benchmarks/compare.py runs edgellm against, each in its own environment
# under .peers/ (or $EDGELLM_PEERS), on the default pair the main job fetched:
#   .peers/llama.cpp-build/bin   llama.cpp's own binaries (llama-completion, llama-speculative-simple,
#                     llama-lookup, llama-bench), built with cmake from the source the llama-cpp-python
#                     sdist vendors (pinned below; ~10 min on 2 cores) the way its users build them
#   .peers/llamacpp   llama-cpp-python, built from source for this CPU (~10 min on 2 cores; skip with
#                     EDGELLM_SKIP_BINDING=1: the binaries are the faster llama.cpp)
#   .peers/genai      onnxruntime-genai + transformers 5 for its model builder (it cannot share an
#                     environment with the exporter's transformers 4.57)
#   .peers/models/hf-*       the GGUF files dequantized into Hugging Face folders (fp32; the
#                            genai builder does not read quantized GGUF, transformers runs them)
#   .peers/models/genai-*    onnxruntime-genai's int4 CPU models (target and draft), made by its own builder
#   ~/.cache/edgellm/bundles/qwen2.5-coder-1.5b+0.5b-int4   the pair with the target re-quantized
#                            to int4 (compare.py --extra-bundle int4=...)
# A step whose output exists is skipped. Logs: .peers/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh export,serve,dev,bench
peers="${EDGELLM_PEERS:-$PWD/.peers}"
cache="${EDGELLM_CACHE:-$HOME/.cache/edgellm}"
mkdir -p "$peers/models"
.venv/bin/edgellm demo --max-new-tokens 8 > /dev/null   # fetches and verifies the GGUF pair (cached)

LLAMA_CPP_PYTHON=0.3.36   # its sdist vendors the llama.cpp source the binaries are built from
bins="$peers/llama.cpp-build/bin"
if [ ! -x "$bins/llama-speculative-simple" ] || [ ! -x "$bins/llama-completion" ] || [ ! -x "$bins/llama-lookup" ]; then
  echo "building llama.cpp's binaries from llama-cpp-python $LLAMA_CPP_PYTHON's source (log: $peers/llama.cpp-build.log)" >&2
  src="$peers/src/llama_cpp_python-$LLAMA_CPP_PYTHON"
  if [ ! -d "$src/vendor/llama.cpp" ]; then
    python3 -m pip download --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$peers/src" \
      > "$peers/llama.cpp-build.log" 2>&1
    tar xzf "$src.tar.gz" -C "$peers/src"
  fi
  { cmake -S "$src/vendor/llama.cpp" -B "$peers/llama.cpp-build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF &&
    cmake --build "$peers/llama.cpp-build" -j"$(nproc)" \
      --target llama-completion llama-speculative-simple llama-lookup llama-bench; } >> "$peers/llama.cpp-build.log" 2>&1
fi
if [ "${EDGELLM_SKIP_BINDING:-0}" != 1 ] && { [ ! -x "$peers/llamacpp/bin/python" ] ||
     ! "$peers/llamacpp/bin/python" -c "import llama_cpp" 2>/dev/null; }; then
  echo "building llama-cpp-python (log: $peers/llamacpp.log)" >&2
  python3 -m venv "$peers/llamacpp"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$peers/llamacpp/bin/pip" install "llama-cpp-python==$LLAMA_CPP_PYTHON" numpy > "$peers/llamacpp.log" 2>&1
fi
if [ ! -x "$peers/genai/bin/python" ] || ! "$peers/genai/bin/python" -c "import onnxruntime_genai" 2>/dev/null; then
  echo "installing onnxruntime-genai (log: $peers/genai.log)" >&2
  python3 -m venv "$peers/genai"
  { "$peers/genai/bin/pip" install "torch==2.13.0" &&
    "$peers/genai/bin/pip" install "onnxruntime-genai==0.18.0" "transformers>=5,<6" onnx onnx_ir gguf safetensors accelerate; } \
    > "$peers/genai.log" 2>&1
fi
for size in 1.5b 0.5b; do
  out="$peers/models/hf-qwen2.5-coder-$size-instruct"
  [ -f "$out/config.json" ] || .venv/bin/python - "$cache/models/qwen2.5-coder-$size-instruct-q4_k_m.gguf" "$out" <<'PY'
import sys, pathlib, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf = pathlib.Path(sys.argv[1])
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[2])
AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).save_pretrained(sys.argv[2])
PY
done
int4="$cache/bundles/qwen2.5-coder-1.5b+0.5b-int4"   # edgellm with the target re-quantized, for comparison
[ -f "$int4/manifest.json" ] || .venv/bin/edgellm export "$cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" \
  --draft "$cache/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" -o "$int4" --quant int4 > "$peers/int4-export.log" 2>&1
for size in 1.5b 0.5b; do   # the target, and the draft for its draft-model speculation
  genai="$peers/models/genai-qwen2.5-coder-$size-int4"
  [ -f "$genai/genai_config.json" ] || "$peers/genai/bin/python" -m onnxruntime_genai.models.builder \
    -i "$peers/models/hf-qwen2.5-coder-$size-instruct" -o "$genai" -p int4 -e cpu -c "$peers/genai-cache" \
    > "$peers/genai-build-$size.log" 2>&1
done
echo "peers ready in $peers" >&2
