"""The generic path: any decoder transformers and optimum can export, when no family record fits.

optimum-onnx's exporter (``text-generation-with-past``) traces the model with torch into one
graph whose past and present keys/values are separate tensors (``present = concat(past, new)``);
int4/int8 weights come from onnxruntime's ``MatMulNBitsQuantizer``. The runtime keeps the cache
in its own buffer and rolls back by length (:class:`edgellm.runtimes.session.ConcatCacheSession`).
It is slower than a native graph — no fused attention, the cache is copied into every call —
and the exporter says so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellm.errors import ConfigError, ExportError
from edgellm.export.source import Source

GENERIC_QUANTS = ("int4", "int8", "fp32")
TASK = "text-generation-with-past"


@dataclass(frozen=True)
class GenericSpec:
    """What the exporter needs to know of a generic decoder (read from ``config.json``)."""

    architecture: str
    vocab_size: int
    source_context_length: int


class GenericSource(Source):
    """A Hugging Face folder of a model type without a family record, exported through optimum."""

    kind = "hf-generic"

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.path, self.config = folder, config
        model_type = config.get("model_type")
        if not _optimum_exports(model_type):
            from edgellm.export.families import FAMILIES

            raise ExportError(f"{folder}: model_type {model_type!r} has no native graph (those: {', '.join(FAMILIES)}) "
                              f"and optimum cannot export it for {TASK}")
        ctx = config.get("max_position_embeddings") or config.get("n_positions") or config.get("n_ctx") or 2048
        self.spec = GenericSpec(str(model_type), int(config["vocab_size"]), int(ctx))

    def has(self, name: str) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "export_path": "generic (optimum)"}


def _optimum_exports(model_type: str | None) -> bool:
    """Whether optimum-onnx exports ``model_type`` for text generation with a cache."""
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the onnx exporters
        from optimum.exporters.tasks import TasksManager
    except ImportError as e:
        raise ExportError("model types without a native graph go through optimum: pip install 'edgellm[export]' "
                          "(optimum-onnx)") from e
    for name in {str(model_type), str(model_type).replace("_", "-")}:
        try:
            if TASK in TasksManager.get_supported_tasks_for_model_type(name, "onnx", library_name="transformers"):
                return True
        except KeyError:
            continue
    return False


def export_generic(src: GenericSource, folder: Path, quant: str, block_size: int, max_context: int,
                   say: Callable[[str], None], lm_head_quant: str | None = None) -> tuple[dict[str, Any], Path | None]:
    """Write ``folder/model.onnx`` (+ ``.data``) for ``src``; return its manifest fields and, when the
    graph is quantized, the path of the fp32 graph it came from (for the quality report; the caller
    deletes it).

    Raises:
        ConfigError: a quantization the generic path lacks.
        ExportError: optimum or the quantizer failed.
    """
    import onnx
    from optimum.exporters.onnx import main_export

    lm_head_quant = lm_head_quant or quant
    for name, value in (("quant", quant), ("lm_head_quant", lm_head_quant)):
        if value not in GENERIC_QUANTS:
            raise ConfigError(f"{name}={value!r} for {src.spec.architecture}, which goes the generic (optimum) way; "
                              f"allowed there: {', '.join(GENERIC_QUANTS)}")
    say(f"{src.spec.architecture} has no native graph: exporting it with optimum (slower at run time than the "
        "native families: no fused attention, the cache is copied into every call)")
    traced = folder.parent / f"_optimum_{folder.name}"
    try:
        main_export(str(src.path), output=str(traced), task=TASK, no_post_process=True, do_validation=False,
                    device="cpu", trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - torch tracing and optimum raise anything
        shutil.rmtree(traced, ignore_errors=True)
        raise ExportError(f"optimum could not export {src.path} ({type(e).__name__}: {str(e)[:300]})") from e
    model = onnx.load(str(traced / "model.onnx"))
    head = [n.name for n in model.graph.node
            if n.op_type == "MatMul" and ("logits" in n.output or n.name.startswith("/lm_head/"))]
    if not head and lm_head_quant != quant:
        raise ExportError(f"{src.path}: the exported graph has no recognizable LM head MatMul for "
                          f"lm_head_quant={lm_head_quant!r}; export with lm_head_quant equal to quant")
    # the body first, without the head; then whatever MatMul is left, the head (nodes_to_include
    # does not restrict onnxruntime's quantizer to those nodes)
    if quant != "fp32":
        model = _quantize(model, quant, block_size, head, say)
    if lm_head_quant != "fp32" and head:
        model = _quantize(model, lm_head_quant, block_size, [], say)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    fp32 = traced / "model.onnx" if (quant, lm_head_quant) != ("fp32", "fp32") else None
    if fp32 is None:
        shutil.rmtree(traced, ignore_errors=True)
    entry = _entry(src, model, quant, block_size if (quant, lm_head_quant) != ("fp32", "fp32") else None, max_context)
    weights = {t.name for t in model.graph.initializer}
    left = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    if left and quant != "fp32":  # onnxruntime's quantizer takes MatMul, not Gemm (GPT-2's Conv1D layers)
        say(f"{len(left)} weight matmuls stay fp32 (the quantizer does not take their form, e.g. Gemm)")
    entry["quantization"] |= {"lm_head_quant": lm_head_quant, "float_matmuls": len(left)}
    return entry, fp32


def _quantize(model, quant: str, block_size: int, exclude: list[str], say: Callable[[str], None]):
    """``model`` with its float MatMul weights but ``exclude`` as ``quant`` MatMulNBits (accuracy level 4)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    say(f"quantizing {'the MatMul weights' if exclude else 'the rest'} to {quant} (block {block_size})")
    q = MatMulNBitsQuantizer(model, bits=4 if quant == "int4" else 8, block_size=block_size, is_symmetric=False,
                             accuracy_level=4, nodes_to_exclude=exclude)
    q.process()
    return q.model.model


def _entry(src: GenericSource, model, quant: str, block_size: int | None, max_context: int) -> dict[str, Any]:
    """The manifest fields of a generic graph, read off its inputs (``block_size``: of its
    MatMulNBits weights, ``None`` when it has none)."""
    inputs = {i.name: i for i in model.graph.input}
    dims = lambda name: [d.dim_value or d.dim_param for d in inputs[name].type.tensor_type.shape.dim]  # noqa: E731
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    _, kv_heads, _, head_dim = dims("past_key_values.0.key")
    cfg = src.config
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or kv_heads)
    io = {"input_ids": "input_ids", "attention_mask": "attention_mask", "past_key": "past_key_values.%d.key",
          "past_value": "past_key_values.%d.value", "present_key": "present.%d.key",
          "present_value": "present.%d.value", "logits": "logits", "num_layers": layers}
    if "position_ids" in inputs:
        io["position_ids"] = "position_ids"
    return {
        "architecture": src.spec.architecture, "num_layers": layers, "num_heads": heads,
        "num_kv_heads": int(kv_heads), "head_dim": int(head_dim),
        "hidden_size": int(cfg.get("hidden_size") or cfg.get("n_embd") or heads * int(head_dim)),
        "vocab_size": src.spec.vocab_size, "max_context": max_context,
        "kv_layout": {"kind": "concat", "dims": ["batch", "num_kv_heads", "past_sequence", "head_dim"],
                      "dtype": "float32"},
        "io": io,
        "quantization": {"quant": quant, "block_size": block_size,
                         "accuracy_level": 4 if block_size else None, "export_path": "generic"},
    }


def full_logits(graph: Path, ids: np.ndarray) -> np.ndarray:
    """Logits float32 ``(n, V)`` of a generic graph over ``ids`` int64 ``(n,)`` in one pass, empty cache."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feed: dict[str, np.ndarray] = {"input_ids": ids[None].astype(np.int64)}
    for i in sess.get_inputs():
        if i.name == "attention_mask":
            feed[i.name] = np.ones((1, len(ids)), np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.arange(len(ids), dtype=np.int64)[None]
        elif i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
    return sess.run(["logits"], feed)[0][0]


def generic_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` when its model type has no family record, else ``None``."""
    from edgellm.export.families import FAMILIES

    path = folder / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return None if cfg.get("model_type") in FAMILIES else cfg
