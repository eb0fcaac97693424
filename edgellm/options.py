"""Choices and defaults that the API, the exporter and the CLI share: one source of truth.

No imports beyond the standard library, so the CLI can build its options (choices, defaults,
help) without loading onnxruntime, numpy or the exporter; the modules that validate these values
import them from here.
"""

from __future__ import annotations

#: decoding modes: speculative (a draft model), target (the baseline), lookup (draft-free n-grams)
MODES = ("speculative", "target", "lookup")

#: graph files a bundle may be loaded from: onnx, or the ORT Mobile copies (export --ort-mobile)
GRAPH_FORMATS = ("onnx", "ort")

#: weight storage of a graph; "gguf" keeps a GGUF file's own quantized blocks exactly
QUANTS = ("int4", "int8", "fp16", "fp32", "gguf")
#: what --quant / --draft-quant take: QUANTS, or "auto" (gguf for a GGUF target, else int4)
EXPORT_QUANTS = ("auto",) + QUANTS
DEFAULT_QUANT = "auto"
DEFAULT_DRAFT_QUANT = "int4"
DEFAULT_BLOCK_SIZE = 32
DEFAULT_DRAFT_BLOCK_SIZE = 128
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_MAX_TARGET_KL = 0.1
#: tokens the draft's LM head keeps by default (FR-Spec; edgellm.export.draft_vocab)
DEFAULT_DRAFT_VOCAB = 32768

#: quality report levels: none, quant (quantized vs fp32 graph), full (also fp32 graph vs the source)
QUALITY_LEVELS = ("none", "quant", "full")
DEFAULT_QUALITY = "quant"

#: export targets: cpu (fused onnxruntime graphs), gpu (the same in fp16), npu (static QDQ-able graphs)
TARGET_DEVICES = ("cpu", "gpu", "npu")
#: npu graph precision: fp32, qdq (uint8 weights), qdq-w4 (int4 weights); uint16 activations
NPU_QUANTS = ("fp32", "qdq", "qdq-w4")
DEFAULT_NPU_WINDOW = 8

#: a generation's length when the request does not say (the manifest's generation.max_new_tokens)
DEFAULT_MAX_NEW_TOKENS = 256

#: generations the server runs at once (llama.cpp's server also has 4 slots), and the sequences
#: one call of an exported target's batch graph holds (edgellm.export.batch_graph)
DEFAULT_MAX_BATCH = 4
