"""The export's quality report: what export and quantization cost, measured, and the verdict on it.

For each model (and each LoRA adapter): the exported graph against an fp32 graph of the same
source, and at level ``full`` the fp32 graph against the source run by transformers, which
refuses an export whose graph differs from its source beyond rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgellm.errors import ExportError

QUALITY_SAMPLE_TOKENS = 256
# quality="full": the fp32 graph against transformers running the source. Rounding moves logits by
# ~1e-5 (tiny models) to ~1e-2 (28 layers); a wrong activation, norm or rope moves them by whole units
MAX_SOURCE_KL, MIN_SOURCE_TOP1 = 1e-3, 0.98
#: ... and the largest logit difference still taken for rounding (the real Gemma 3 270M: 7.6e-5 over
#: 256 tokens), since a wrong graph can keep top-1 and KL: a Gemma 2 graph against a reference
#: without its attention soft-cap differed by 5 with top-1 1.0
MAX_SOURCE_DIFF = 0.1
MIN_DRAFT_TOP1 = 0.5  # below this a draft costs more than it saves: warn


def model_quality(tmp: Path, role: str, src, qcfg, entry: dict, ctx: int, level: str, tok_entry: dict, say,
             logits_tokens=None, adapters=()) -> dict:
    """Measure the exported graph against an fp32 graph (and the source model at level ``full``).

    A draft whose head keeps ``logits_tokens`` only is scored on them: KL and logit differences
    over those columns (renormalized), top-1 agreement over the whole vocabulary, and
    ``draft_vocab_coverage``, how often the fp32 graph's top token is among them.
    """
    from edgellm.export.builder import DecoderBuilder, QuantConfig, io_names
    from edgellm.export.quality import compare_logits, graph_logits, source_logits
    from edgellm.runtimes.session import KVLayout

    ids = sample_ids(tmp, tok_entry, ctx)
    lora = entry.get("lora")  # the fp32 reference graph's branches are fp32 whatever the exported graph computes in
    layout = KVLayout(entry["num_layers"], entry["num_kv_heads"], entry["head_dim"], ctx, entry["vocab_size"],
                      io_names(entry["num_layers"]), lora=lora and {**lora, "dtype": "float32"})
    got_layout = KVLayout(**{**layout.__dict__, "dtype": entry["kv_layout"]["dtype"], "lora": lora})
    static = entry["kv_layout"]["kind"] == "static_window"
    vocab = tok_entry["vocab_size"]
    result: dict[str, Any] = {"quantization": entry["quantization"], "sample_tokens": int(len(ids)),
                              "import": import_note(src, entry["quantization"])}
    ref_dir = tmp / f"_fp32_{role}"
    try:
        if qcfg.quant == "fp32" and not static and logits_tokens is None:
            ref = graph_logits(tmp / entry["graph"], layout, ids)
        else:
            say(f"{role}: building an fp32 reference graph for the quality report")
            ref_dir.mkdir()
            ref_graph = DecoderBuilder(src, QuantConfig("fp32"), ctx).build(ref_dir)
            if adapters:
                from edgellm.export.lora import add_branches, sites

                add_branches(ref_graph, list(entry["lora"]["sites"]), sites(src.spec))
            ref = graph_logits(ref_graph, layout, ids)
            say(f"{role}: scoring the {'npu' if static else qcfg.quant} graph against fp32")
            result.update(_against_fp32(tmp, entry, ref, got_layout, ids, vocab, logits_tokens))
        if level == "full":
            say(f"{role}: running the source model in transformers")
            result["fp32_vs_source"] = compare_logits(source_logits(src, ids), ref, vocab)
        if adapters:
            ref_graph = ref_dir / "model.onnx" if ref_dir.exists() else tmp / entry["graph"]
            result["adapters"] = _adapter_quality(tmp / entry["graph"], ref_graph, layout, got_layout, ids, vocab,
                                                  adapters, src if level == "full" else None, say, logits_tokens)
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)
    return result


def _against_fp32(tmp: Path, entry: dict, ref, got_layout, ids, vocab: int, logits_tokens) -> dict[str, Any]:
    """The exported graph's (and an npu step graph's) logits against the fp32 graph's ``ref`` ``(n, V)``."""
    import numpy as np

    from edgellm.export.quality import compare_logits, graph_logits, static_graph_logits

    if entry["kv_layout"]["kind"] == "static_window":
        out = {"npu_graph_vs_fp32": compare_logits(ref, static_graph_logits(tmp / entry["graph"], dict(entry), ids),
                                                   vocab)}
        if entry.get("step_graph"):
            step = entry | {"kv_layout": entry["kv_layout"] | {"window": 1}}
            out["npu_step_graph_vs_fp32"] = compare_logits(ref, static_graph_logits(tmp / entry["step_graph"], step,
                                                                                    ids), vocab)
        return out
    got = graph_logits(tmp / entry["graph"], got_layout, ids, logits_tokens=logits_tokens)
    if logits_tokens is None:
        return {"quantized_vs_fp32": compare_logits(ref, got, vocab)}
    top1 = ref[:, :vocab].argmax(-1)
    return {"quantized_vs_fp32": compare_logits(ref[:, logits_tokens], got[:, logits_tokens], len(logits_tokens)) | {
        "top1_agreement": float((top1 == got[:, :vocab].argmax(-1)).mean()),
        "draft_vocab_coverage": float(np.isin(top1, logits_tokens).mean())}}


def _adapter_quality(graph: Path, ref_graph: Path, layout, got_layout, ids, vocab: int, adapters, src, say,
                     logits_tokens=None) -> dict:
    """Each adapter's quality report: the exported graph with it against the fp32 graph with it, and
    (``src`` given: level ``full``) the fp32 graph with it against transformers + PEFT, merged.
    A draft with a reduced LM head (``logits_tokens``) is scored on its tokens, as without adapters."""
    from edgellm.export.lora import ort_values
    from edgellm.export.quality import compare_logits, graph_logits, source_logits

    out = {}
    for a in adapters:
        say(f"adapter {a.name}: scoring the graph with it")
        ref = graph_logits(ref_graph, layout, ids, adapter=(a.name, ort_values(a)))
        got = graph_logits(graph, got_layout, ids, logits_tokens=logits_tokens,
                           adapter=(a.name, ort_values(a, got_layout.dtype)))
        if logits_tokens is None:
            r = {"quantized_vs_fp32": compare_logits(ref, got, vocab)}
        else:
            top1 = float((ref[:, :vocab].argmax(-1) == got[:, :vocab].argmax(-1)).mean())
            r = {"quantized_vs_fp32": compare_logits(ref[:, logits_tokens], got[:, logits_tokens], len(logits_tokens))
                 | {"top1_agreement": top1}}
        del got
        if src is not None:
            say(f"adapter {a.name}: running the source model with it merged (transformers + PEFT)")
            r["fp32_vs_source"] = compare_logits(source_logits(src, ids, adapter=a.path), ref, vocab)
        out[a.name] = r
    return out


def sample_ids(tmp: Path, tok_entry: dict, ctx: int):
    """The quality sample's token ids, int64 ``(n,)``, at most ``ctx`` of them."""
    import numpy as np
    from tokenizers import Tokenizer

    from edgellm.export.quality import sample_text

    tok = Tokenizer.from_file(str(tmp / tok_entry["file"]))
    return np.array(tok.encode(sample_text()).ids[: min(QUALITY_SAMPLE_TOKENS, ctx)], np.int64)


def import_note(src, quantization: dict) -> dict:
    """Was the import lossless? (Did any weight get rounded on its way into the graph?)"""
    quant = quantization["quant"]
    if src.kind != "gguf":
        return {"lossless": quant == "fp32", "note": "weights read from safetensors"}
    if quant != "gguf":
        return {"lossless": quant == "fp32", "lossless_matmul_weights": quant == "fp32",
                "note": ("GGUF blocks dequantized to fp32, then re-quantized" if quant != "fp32"
                         else "GGUF blocks dequantized to fp32 exactly"),
                "gguf_tensor_types": src.quant_types()}
    matmuls_exact = not quantization["requantized_int8"]
    return {"lossless": False, "lossless_matmul_weights": matmuls_exact,
            "note": ("every matmul weight keeps its GGUF blocks exactly" if matmuls_exact else
                     f"GGUF blocks kept exactly except {len(quantization['requantized_int8'])} weights "
                     "re-quantized to int8") + "; the token embedding is dequantized and stored fp16 "
                    "(rounding <= 2^-11 relative)",
            "gguf_tensor_types": src.quant_types()}


def _graph_score(r: dict) -> dict | None:
    """The exported graph's score against fp32 in one model's quality report (cpu/gpu or npu graph)."""
    return r.get("quantized_vs_fp32") or r.get("npu_graph_vs_fp32")


def judge(report: dict, max_target_kl: float, say) -> None:
    target = _graph_score(report["models"].get("target", {}))
    scored = list(report["models"].items())
    scored += [(f"target with adapter {n}", r) for n, r in report["models"].get("target", {}).get("adapters", {}).items()]
    for role, r in scored:
        q = _graph_score(r)
        if q:
            say(f"quality {role}: top-1 agreement {q['top1_agreement']:.3f}, mean KL {q['mean_kl']:.4f} "
                f"over {q['positions']} tokens vs fp32")
        if q and "draft_vocab_coverage" in q:
            say(f"quality {role}: its LM head's tokens hold the fp32 graph's top token at "
                f"{q['draft_vocab_coverage']:.3f} of the positions")
        if role == "draft" and q and q.get("draft_vocab_coverage", 1.0) < MIN_DRAFT_TOP1:
            warn(f"the draft's LM head keeps tokens that hold its fp32 graph's top token at only "
                  f"{q['draft_vocab_coverage']:.3f} of the sample's positions (< {MIN_DRAFT_TOP1}): raise "
                  "--draft-vocab, or count over text like yours with --draft-vocab-corpus")
        elif role == "draft" and q and q["top1_agreement"] < MIN_DRAFT_TOP1:
            warn(f"the draft's quantization leaves top-1 agreement {q['top1_agreement']:.3f} with its fp32 graph "
                  f"(< {MIN_DRAFT_TOP1}): the target will reject most of its proposals. "
                  + _less_quantized_hint(r.get("quantization", {})))
        src = r.get("fp32_vs_source")
        if src:
            say(f"quality {role}: fp32 graph vs source max |logit diff| {src['max_abs_diff']:.2e}, "
                f"mean KL {src['mean_kl']:.2e}, top-1 agreement {src['top1_agreement']:.3f}")
            if (src["mean_kl"] > MAX_SOURCE_KL or src["top1_agreement"] < MIN_SOURCE_TOP1
                    or src["max_abs_diff"] > MAX_SOURCE_DIFF):
                raise ExportError(f"{role}: the fp32 graph differs from the source model beyond rounding (mean KL "
                                  f"{src['mean_kl']:.3g}, allowed <= {MAX_SOURCE_KL}; top-1 agreement "
                                  f"{src['top1_agreement']:.3f}, allowed >= {MIN_SOURCE_TOP1}; max |logit diff| "
                                  f"{src['max_abs_diff']:.3g}, allowed <= {MAX_SOURCE_DIFF}): a config field this "
                                  "exporter does not implement? Nothing was written; please report the model")
    report["max_target_kl"] = max_target_kl
    report["target_within_threshold"] = None if target is None else target["mean_kl"] <= max_target_kl
    if target is not None and target["mean_kl"] > max_target_kl:
        warn(f"the target's quantization costs mean KL {target['mean_kl']:.4f} > max_target_kl {max_target_kl} "
              f"(top-1 agreement {target['top1_agreement']:.3f}); its output quality suffers. "
              + _less_quantized_hint(report["models"]["target"].get("quantization", {}), target=True))


def warn(msg: str) -> None:
    """One warning, shown once, through ``warnings`` (the CLI prints it as ``Warning: ...``)."""
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _less_quantized_hint(quantization: dict, *, target: bool = False) -> str:
    """What to export instead, from what this model is now (never the option it already has)."""
    q = quantization.get("quant")
    flag = "--quant" if target else "--draft-quant"
    npu_flag = "--npu-quant" if target else "--npu-draft-quant"
    better = {"qdq-w4": f"{npu_flag} qdq", "qdq": f"{npu_flag} fp32", "int4": f"{flag} int8",
              "int8": f"{flag} fp16", "fp16": f"{flag} fp32"}
    if q == "int4":
        hint = f"{flag} int8, or a smaller {'--block-size' if target else '--draft-block-size'}"
        if quantization.get("block_size", 0) <= 16:
            hint = f"{flag} int8"
    else:
        hint = better.get(q)
    return f"Export it with {hint}." if hint else "Use a closer draft model." if not target else ""
