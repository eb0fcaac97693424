"""The export pipeline: :func:`export` and its steps (sources, tokenizer, each model's graphs, quality, manifest).

The only part of edgellm that may import torch / transformers, and only inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from edgellm.errors import ConfigError, ExportError
from edgellm.export.draft_vocab import write_ids
from edgellm.export.output import PARTIAL_OWNER, progress_printer, writing
from edgellm.export.report import judge, model_quality, sample_ids, warn
from edgellm.options import (  # the defaults, shared with the CLI
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DRAFT_BLOCK_SIZE,
    DEFAULT_DRAFT_QUANT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_TARGET_KL,
    DEFAULT_NPU_WINDOW,
    DEFAULT_QUALITY,
    DEFAULT_QUANT,
)

def export(
    target: str | Path,
    *,
    output: str | Path,
    draft: str | Path | None = None,
    quant: str = DEFAULT_QUANT,
    draft_quant: str = DEFAULT_DRAFT_QUANT,
    block_size: int = DEFAULT_BLOCK_SIZE,
    draft_block_size: int = DEFAULT_DRAFT_BLOCK_SIZE,
    lm_head_quant: str | None = None,
    draft_lm_head_quant: str | None = None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    quality: str = DEFAULT_QUALITY,
    max_target_kl: float = DEFAULT_MAX_TARGET_KL,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    ort_mobile: bool = False,
    target_device: str = "cpu",
    npu_window: int = DEFAULT_NPU_WINDOW,
    npu_quant: str = "fp32",
    npu_draft_quant: str | None = None,
    calibration_text: str | os.PathLike | None = None,
    draft_vocab: int | None = None,
    draft_vocab_corpus: str | os.PathLike | None = None,
    lora: dict[str, str | os.PathLike] | list[str] | None = None,
    draft_lora: dict[str, str | os.PathLike] | list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export ``target`` (and ``draft``) into a bundle folder at ``output``.

    Args:
        target: Hugging Face folder, ``.gguf`` file, or hub id (online only).
        output: bundle folder to create; written to a temporary sibling and renamed at the end.
        draft: optional draft model, same forms as ``target``; must share the tokenizer.
        quant: target weights: ``int4``, ``int8``, ``fp16``, ``fp32``, ``gguf`` (a GGUF file's
            own quantized blocks, kept exactly: no second rounding) or ``auto`` (``gguf`` for a
            GGUF target, else ``int4``).
        draft_quant: draft weights, same choices (quantize it hard: it only changes speed).
        block_size: MatMulNBits block size of the target.
        draft_block_size: MatMulNBits block size of the draft.
        lm_head_quant: storage of the target's output projection. ``None``: int8 when
            ``quant`` is int4 (the head decides every token: guard it), else ``quant``.
        draft_lm_head_quant: the same for the draft's output projection (``None``: int8 when
            ``draft_quant`` is int4, else ``draft_quant``); int4 makes its step cheaper and may
            cost some acceptance, never output.
        max_context: KV-cache length (prompt + generated tokens) the bundle supports.
        quality: ``none``, ``quant`` (quantized vs fp32 graph) or ``full`` (also fp32 graph vs
            the source model in transformers).
        max_target_kl: warn loudly when the target's quantization costs more than this mean KL.
        overwrite: replace an existing ``output``.
        trust_remote_code: let transformers run code shipped with a model (off by default).
        ort_mobile: also write ``.ort`` graphs and ``required_operators.config`` for apps that
            ship a minimal onnxruntime (see :mod:`edgellm.export.ort_mobile`).
        target_device: ``cpu`` (dynamic shapes, fused onnxruntime operators), ``gpu`` (the
            same graphs computing in fp16: activations, KV cache, norms; weights int4 by
            default, ``quant`` int4/int8/fp16) or ``npu`` (static shapes, standard operators,
            fp32 or QDQ; see :mod:`edgellm.export.static_builder`).
        npu_window: tokens per call of the ``npu`` graphs (a verify pass holds up to this many).
        npu_draft_quant: the draft's ``npu_quant`` (``None``: the same); e.g. ``qdq-w4`` for the
            draft (speed) and ``qdq`` for the target (quality).
        draft_vocab: tokens the draft's LM head keeps, the most frequent ones (FR-Spec; see
            :mod:`edgellm.export.draft_vocab`); 0 keeps them all; ``None``: 32768 (all for npu graphs).
            The output stays exactly the target's; the draft step gets cheaper.
        draft_vocab_corpus: a UTF-8 text file to count token frequencies over (default: the
            Python standard library's source).
        calibration_text: a UTF-8 text file to calibrate the QDQ graphs on (its first
            16 windows of tokens); default: the sample text shipped with edgellm. Calibrate on text
            like what the model will see (code for a coder model).
        npu_quant: ``fp32``, ``qdq`` or ``qdq-w4``: static QDQ quantization of the npu graphs (uint16
            activations, uint8 weights) calibrated on sample text (see :mod:`edgellm.export.qdq`).
        lora: LoRA adapters over the target, ``{NAME: PEFT folder}`` (or ``["NAME=FOLDER", ...]``):
            the target graph gets LoRA branches whose matrices each request binds (``generate(adapter=NAME)``,
            the server's ``model`` field); see :mod:`edgellm.export.lora`. Add more later with :func:`add_lora`.
        draft_lora: for some of those names, a LoRA adapter over the draft (a fine-tune of the draft in
            the same way), bound to the draft with the target's adapter: without one the draft stays the base's.
        progress: called with one-line progress messages.

    Returns:
        The bundle folder.

    (Long for its argument list: every export option is a keyword here, documented once.)

    Raises:
        ConfigError: a bad option value, or ``output`` exists without ``overwrite``.
        ExportError: a model cannot be read or converted.
        IncompatibleModelsError: draft and target do not share a tokenizer.
    """
    from edgellm.export.options import ExportOptions

    out = Path(output).expanduser()
    opts = ExportOptions(quant=quant, draft_quant=draft_quant, block_size=block_size, draft_block_size=draft_block_size,
                         lm_head_quant=lm_head_quant, draft_lm_head_quant=draft_lm_head_quant,
                         max_context=max_context, quality=quality,
                         max_target_kl=max_target_kl, trust_remote_code=trust_remote_code, ort_mobile=ort_mobile,
                         target_device=target_device, npu_window=npu_window, npu_quant=npu_quant,
                         npu_draft_quant=npu_draft_quant, calibration_text=calibration_text, draft_vocab=draft_vocab,
                         draft_vocab_corpus=draft_vocab_corpus, lora=lora, draft_lora=draft_lora,
                         has_draft=draft is not None)
    t0 = time.perf_counter()
    say = progress_printer(progress, t0)
    with writing(out, overwrite) as tmp:
        _export_into(tmp, target, draft, opts, say)
    say(f"bundle written to {out}")
    return out


def _quant_config(src, *, quant: str, block_size: int, lm_head_quant: str | None, activations: str = "fp32"):
    """Resolve ``auto`` and the output projection's default for this source."""
    from edgellm.export.builder import QuantConfig

    if quant == "auto":
        quant = "gguf" if src.kind == "gguf" else "int4"
    if "gguf" in (quant, lm_head_quant) and src.kind != "gguf":
        raise ConfigError(f"quant='gguf' keeps a GGUF file's own blocks, but {src.path} is a {src.kind} "
                          "model; allowed for it: auto, int4, int8, fp16, fp32")
    if lm_head_quant is None:
        lm_head_quant = "int8" if quant == "int4" else quant
    return QuantConfig(quant, block_size, lm_head_quant=lm_head_quant, activations=activations)


def _export_into(tmp: Path, target, draft, opts, say) -> None:
    """The export's steps, writing into the temporary folder ``tmp`` (``opts``: :class:`ExportOptions`)."""
    from edgellm.export.source import open_source

    sources = {"target": open_source(target)} | ({"draft": open_source(draft)} if draft is not None else {})
    adapters = {role: _read_adapters(opts.lora_of(role), src, say) for role, src in sources.items()}
    qcfg = {role: _quant_config(src, **opts.quant_plan(role)) for role, src in sources.items()}
    toks, tok_entry = _tokenizers(tmp, sources, opts, say)
    vocab = _draft_vocab(tmp, sources, toks, tok_entry, opts, say)
    models, report, manifest_adapters = {}, {"models": {}}, {}
    for role, src in sources.items():
        models[role], result = _export_role(tmp, role, src, qcfg[role], opts, tok_entry,
                                            vocab if role == "draft" else None, adapters[role], manifest_adapters, say)
        if result:
            report["models"][role] = result
    judge(report, opts.max_target_kl, say)
    ort_entry = _ort_mobile(tmp, models, say) if opts.ort_mobile else None
    (tmp / "quality.json").write_text(json.dumps(report, indent=2))
    _write_manifest(tmp, models, tok_entry, ort_entry, manifest_adapters, say)


def _tokenizers(tmp: Path, sources: dict, opts, say) -> tuple[dict, dict]:
    """Each model's tokenizer (draft and target must agree), and the bundle's tokenizer entry."""
    from edgellm.export.tokenizer import check_compatible, tokenizer_files, write_tokenizer

    say("reading tokenizers")
    toks = {role: tokenizer_files(src, trust_remote_code=opts.trust_remote_code) for role, src in sources.items()}
    if "draft" in sources:
        check_compatible(toks["target"], toks["draft"], sources["target"].spec.vocab_size,
                         sources["draft"].spec.vocab_size)
    return toks, write_tokenizer(toks["target"], tmp / "tokenizer")


def _draft_vocab(tmp: Path, sources: dict, toks: dict, tok_entry: dict, opts, say):
    """The tokens the draft's LM head keeps and their manifest entry (``None``: all of them)."""
    if "draft" not in sources:
        return None
    if sources["draft"].kind == "hf-generic":
        say("draft: a generic (optimum) graph keeps its whole LM head")
        return None
    return opts.vocab.choose(tmp / tok_entry["file"], sources["draft"].spec.vocab_size, toks["target"].eos_token_ids)


def _export_role(tmp: Path, role: str, src, qcfg, opts, tok_entry: dict, vocab, adapters: tuple[list, dict],
                 manifest_adapters: dict, say) -> tuple[dict[str, Any], dict | None]:
    """One model's graphs (with its adapters' branches, reduced head, QDQ, shared step weights):
    its manifest entry and quality report (``None`` at ``quality='none'``)."""
    ctx = min(opts.max_context, src.spec.source_context_length)
    if ctx < opts.max_context:
        warn(f"{role}: max_context={opts.max_context} is more than the model was trained for "
             f"({src.spec.source_context_length} positions); its bundle uses {ctx}")
    if src.kind == "hf-generic":
        return _export_generic_model(tmp, role, src, qcfg, ctx, opts.quality, tok_entry, say, opts.static_window)
    tokens = vocab[0] if vocab else None
    if tokens is not None:
        say(f"draft: its LM head keeps the {len(tokens)} most frequent tokens ({vocab[1]['corpus']})")
    entry = _export_model(tmp, role, src, qcfg, ctx, say, opts.static_window, tokens)
    if adapters[0]:
        from edgellm.export.lora import attach

        attach(tmp, entry, *adapters, manifest_adapters, say, role)
    if role == "target" and entry["kv_layout"]["kind"] == "shared_buffer":
        batch_graph_entry(tmp, entry, say)
    if tokens is not None:
        write_ids(tmp / vocab[1]["file"], tokens)
        entry["draft_vocab"] = vocab[1]
    if opts.static_window and opts.npu_quant_of(role) != "fp32":
        _quantize_npu(tmp, role, entry, tok_entry, say, 4 if opts.npu_quant_of(role) == "qdq-w4" else 8,
                      opts.calibration)
    if entry.get("step_graph"):
        from edgellm.export.shared_weights import share_weights

        saved = share_weights(tmp / entry["graph"], tmp / entry["step_graph"])
        say(f"{role}: the step graph reads {saved / 1e6:.0f} MB of weights from the window graph's file")
    if opts.quality == "none":
        return entry, None
    return entry, model_quality(tmp, role, src, qcfg, entry, ctx, opts.quality, tok_entry, say, tokens, adapters[0])


def batch_graph_entry(tmp: Path, entry: dict[str, Any], say, slots: int = DEFAULT_MAX_BATCH) -> str | None:
    """The target's batch graph beside its graph (:mod:`edgellm.export.batch_graph`), named in ``entry``;
    a graph that cannot be batched gets none (the server's slots then take turns): returns why, else ``None``."""
    from edgellm.export.batch_graph import write_batch_graph

    graph = tmp / entry["graph"]
    rel = str(Path(entry["graph"]).with_name("batch.onnx"))
    reason = write_batch_graph(graph, tmp / rel, entry["io"], slots)
    if reason is None:
        entry |= {"batch_graph": rel, "batch_slots": slots}
        say(f"target: batch graph for {slots} sequences per pass ({rel})")
    else:
        entry.pop("batch_graph", None), entry.pop("batch_slots", None)
        say(f"target: no batch graph ({reason}): served sequences will take turns")
    return reason


def _ort_mobile(tmp: Path, models: dict, say) -> dict:
    """ORT Mobile copies of every graph; the models' entries name them."""
    from edgellm.export.ort_mobile import write_ort_models

    ort_entry = write_ort_models(tmp, list(models), progress=say)
    for role, entry in models.items():
        entry["ort_graph"] = f"{role}/model.ort"
        if entry.get("step_graph"):
            entry["ort_step_graph"] = f"{role}/step.ort"
    return ort_entry


def _write_manifest(tmp: Path, models: dict, tok_entry: dict, ort_entry: dict | None, adapters: dict, say) -> None:
    """Hash every file written and write the manifest (checked as the runtime will read it)."""
    from edgellm import __version__
    from edgellm.bundle import sha256_file
    from edgellm.manifest import FORMAT_VERSION, MANIFEST_NAME, manifest_digest, parse_manifest

    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and p != tmp / PARTIAL_OWNER:
            rel = p.relative_to(tmp).as_posix()
            say(f"hashing {rel}")
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "edgellm_version": __version__,
        "models": models,
        "tokenizer": tok_entry,
        # what the runtime reads (gamma is adaptive, sampling is per request): only the default length
        "generation": {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS},
        "quality_report": "quality.json",
        "files": files,
    }
    if ort_entry:
        manifest["ort_mobile"] = ort_entry
    if adapters:
        manifest["adapters"] = adapters
    manifest["manifest_sha256"] = manifest_digest(manifest)
    parse_manifest(manifest)  # the exporter never writes what the runtime would refuse
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def _read_adapters(lora: dict[str, Path], src, say) -> tuple[list, dict]:
    """Read and check every adapter against its base before any graph is built: ``(adapters, sites)``."""
    if not lora:
        return [], {}
    from edgellm.export.lora import read_adapter, sites

    if src.kind == "hf-generic":
        raise ExportError(f"lora: the model ({src.spec.architecture}) goes the generic (optimum) way, whose graph "
                          "has no LoRA branches; merge the adapter into the model and export that")
    table = sites(src.spec)
    adapters = []
    for name, path in lora.items():
        say(f"adapter {name}: reading {path}")
        adapters.append(read_adapter(name, path, table))
    return adapters, table


def _export_model(tmp: Path, role: str, src, qcfg, max_context: int, say,
                  npu_window: int | None = None, logits_tokens=None) -> dict[str, Any]:
    from edgellm.export.builder import DecoderBuilder, io_names
    from edgellm.export.static_builder import StaticDecoderBuilder, static_io_names

    s = src.spec
    say(f"{role}: {s.architecture}, {s.num_layers} layers, hidden {s.hidden_size}, "
        f"vocab {s.vocab_size}, from {src.describe()['kind']} -> {qcfg.quant}"
        + (f", static npu graph of {npu_window} tokens" if npu_window else ""))
    folder = tmp / role
    folder.mkdir()
    progress = lambda m: say(f"{role}: {m}")  # noqa: E731
    if npu_window:
        if not s.features.plain:
            raise ExportError(f"{role}: {s.architecture} with its settings (norm offsets, q/k norms, rope scaling, "
                              "sliding windows, soft-caps, experts or another activation) has no npu graph yet; "
                              "export it with --target-device cpu or gpu")
        builder = StaticDecoderBuilder(src, max_context, npu_window, progress=progress)
        kv_layout = {"kind": "static_window", "window": npu_window, "rope_theta": s.rope_theta,
                     "attention_mask": "indicator", "cache_length": builder.cache_length,
                     "dims": ["batch", "num_kv_heads", "max_context", "head_dim"], "dtype": "float32"}
        io = static_io_names(s.num_layers)
    else:
        builder = DecoderBuilder(src, qcfg, max_context, progress=progress, logits_tokens=logits_tokens)
        kv_layout = {"kind": "shared_buffer", "dims": ["batch", "num_kv_heads", "max_context", "head_dim"],
                     "dtype": "float16" if qcfg.activations == "fp16" else "float32"}
        io = io_names(s.num_layers)
    builder.build(folder)
    step_graph = None
    if npu_window and npu_window > 1 and role == "draft":
        # the draft proposes one token at a time: a one-token graph spares it the padded window
        progress("one-token step graph")
        StaticDecoderBuilder(src, max_context, 1, progress=lambda m: None,
                             cache_length=builder.cache_length).build(folder, "step.onnx")
        step_graph = f"{role}/step.onnx"
    quantization = qcfg.to_dict()
    if getattr(builder, "experts", None):  # how a mixture of experts computes them (see DecoderBuilder._experts)
        quantization["experts"] = builder.experts
    if qcfg.quant == "gguf":
        kept: dict[str, int] = {}
        for t in builder.kept.values():
            kept[t] = kept.get(t, 0) + 1
        quantization["gguf_blocks_kept"] = kept
        quantization["requantized_int8"] = builder.requantized
        say(f"{role}: kept {sum(kept.values())} GGUF tensors exactly ({kept}); "
            f"re-quantized to int8: {len(builder.requantized)}")
    return {
        "graph": f"{role}/model.onnx",
        "architecture": s.architecture,
        "num_layers": s.num_layers,
        "num_heads": s.num_heads,
        "num_kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "vocab_size": s.vocab_size,
        "max_context": max_context,
        "kv_layout": kv_layout,
        "io": io,
        "quantization": quantization,
        "source": {k: v for k, v in src.describe().items() if k != "path"} | {"name": Path(str(src.path)).name},
    } | ({"step_graph": step_graph} if step_graph else {})


def _quantize_npu(tmp: Path, role: str, entry: dict, tok_entry: dict, say, weight_bits: int,
                  calibration_text: tuple[str, str] | None = None) -> None:
    import numpy as np
    from tokenizers import Tokenizer

    from edgellm.export.qdq import CALIBRATION_WINDOWS, FLOAT_LAYERS, quantize_npu_graph
    from edgellm.export.quality import sample_text

    name, text = calibration_text or ("edgellm/data/quality_sample.txt", sample_text())
    tok = Tokenizer.from_file(str(tmp / tok_entry["file"]))
    ids = np.array(tok.encode(text).ids, np.int64)[: min(entry["max_context"],
                                                        CALIBRATION_WINDOWS * entry["kv_layout"]["window"])]
    keep_float = FLOAT_LAYERS if role == "target" else ()  # guard the target, squeeze the draft
    prepared = quantize_npu_graph(tmp / entry["graph"], entry, ids, say, weight_bits, keep_float=keep_float)
    if entry.get("step_graph"):  # same mask values: the weights stay shared
        quantize_npu_graph(tmp / entry["step_graph"], entry | {"kv_layout": entry["kv_layout"] | {"window": 1}}, ids,
                           say, weight_bits, prepared, keep_float)
    entry["quantization"] = {"quant": "qdq" if weight_bits == 8 else "qdq-w4", "activations": "uint16",
                             "weights": "uint8" if weight_bits == 8 else "int4",
                             "calibration_text": name, "calibration_tokens": int(len(ids)),
                             "mask_values": [round(v, 1) for v in prepared.mask_values.values()],
                             "float_layers": [f"*{s} (fp16 weights)" for s in keep_float]}


def _export_generic_model(tmp: Path, role: str, src, qcfg, ctx: int, quality: str, tok_entry: dict, say,
                          npu_window: int | None) -> tuple[dict[str, Any], dict | None]:
    """A model type without a family record, through optimum: its manifest entry and quality report."""
    from edgellm.export.generic import export_generic, full_logits
    from edgellm.export.quality import compare_logits, source_logits

    if npu_window:
        raise ExportError(f"{role}: {src.spec.architecture} goes the generic (optimum) way, which has no npu graph; "
                          "export it with --target-device cpu")
    folder = tmp / role
    folder.mkdir()
    entry, fp32 = export_generic(src, folder, qcfg.quant, qcfg.block_size, ctx, say, qcfg.lm_head_quant)
    entry = {"graph": f"{role}/model.onnx", **entry,
             "source": {"kind": src.kind, "name": Path(str(src.path)).name, "export_path": "generic"}}
    try:
        if quality == "none":
            return entry, None
        ids, vocab = sample_ids(tmp, tok_entry, ctx), tok_entry["vocab_size"]
        say(f"{role}: scoring the generic graph")
        got = full_logits(folder / "model.onnx", ids)
        ref = full_logits(fp32, ids) if fp32 else got
        result: dict[str, Any] = {"quantization": entry["quantization"], "sample_tokens": int(len(ids)),
                                  "import": {"lossless": fp32 is None, "note": "generic path (optimum)"}}
        if fp32:
            result["quantized_vs_fp32"] = compare_logits(ref, got, vocab)
        if quality == "full":
            say(f"{role}: running the source model in transformers")
            result["fp32_vs_source"] = compare_logits(source_logits(src, ids), ref, vocab)
        return entry, result
    finally:
        if fp32:
            shutil.rmtree(fp32.parent, ignore_errors=True)
