"""edgellm.export: turn a target (and a draft) model into one self-describing bundle.

The only part of edgellm that may import torch / transformers, and only inside functions.
"""

from __future__ import annotations

import json
import logging
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
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_TARGET_KL,
    DEFAULT_NPU_WINDOW,
    DEFAULT_QUALITY,
    DEFAULT_QUANT,
)

logger = logging.getLogger(__name__)

__all__ = ["export", "add_lora", "DEFAULT_QUANT", "DEFAULT_DRAFT_QUANT"]



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
            ``quant`` is int4 (the head decides every token: guard it), else ``quant``. The
            draft's head follows ``draft_quant``.
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

    Raises:
        ConfigError: a bad option value, or ``output`` exists without ``overwrite``.
        ExportError: a model cannot be read or converted.
        IncompatibleModelsError: draft and target do not share a tokenizer.
    """
    from edgellm.export.options import ExportOptions

    out = Path(output).expanduser()
    opts = ExportOptions(quant=quant, draft_quant=draft_quant, block_size=block_size, draft_block_size=draft_block_size,
                         lm_head_quant=lm_head_quant, max_context=max_context, quality=quality,
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


def add_lora(bundle: str | Path, lora: dict[str, str | os.PathLike] | list[str], *, replace: bool = False,
             draft_lora: dict[str, str | os.PathLike] | list[str] | None = None,
             progress: Callable[[str], None] | None = None) -> Path:
    """Add LoRA adapters to an exported bundle, without the base model and without re-exporting it.

    The bundle is checked (every hash), each adapter against the bundle's target; then a copy of
    the bundle (hard links for the unchanged weights) gets the adapters' files, LoRA branches on
    any linear layer they touch that has none yet, and a new manifest, and replaces the bundle
    in one rename. On any error the bundle is left as it was.

    Args:
        bundle: a bundle folder written by :func:`export` (by an edgellm with LoRA support).
        lora: ``{NAME: PEFT folder}`` or ``["NAME=FOLDER", ...]``.
        replace: replace adapters of the same names (otherwise an error).
        draft_lora: draft adapters for some of those names (see :func:`export`).
        progress: called with one-line progress messages.

    Returns:
        The bundle folder.

    Raises:
        ConfigError: a bad name, or one the bundle has already (without ``replace``).
        ExportError: an adapter does not fit the bundle's target (see :func:`edgellm.export.lora.read_adapter`).
        BundleError: the bundle is damaged.
    """
    from edgellm.export.lora import attach, entry_sites, parse_lora_args, read_adapter
    from edgellm.export.options import check_draft_lora
    from edgellm.manifest import MANIFEST_NAME, check_bundle, manifest_digest, parse_manifest, read_manifest, sha256_file

    out = Path(bundle).expanduser()
    adapters_given = parse_lora_args(lora)
    if not adapters_given:
        raise ConfigError("lora: no adapter given; allowed: NAME=PATH, one or more", param="lora")
    drafts_given = parse_lora_args(draft_lora)
    say = progress_printer(progress, time.perf_counter())
    manifest = read_manifest(out)
    check_bundle(out, manifest)
    check_draft_lora(drafts_given, adapters_given, manifest.draft is not None)
    clash = sorted(set(adapters_given) & set(manifest.adapters))
    if clash and not replace:
        raise ConfigError(f"the bundle has an adapter named {clash[0]!r} already; pass replace=True (--replace) to "
                          "replace it, or give another name", param="lora")
    if manifest.target.ort_graph:
        raise ConfigError("the bundle has ORT Mobile graphs (--ort-mobile), which take no LoRA branches; re-export "
                          "it without --ort-mobile", param="lora")
    table = entry_sites(manifest.target)
    adapters = [read_adapter(name, path, table) for name, path in adapters_given.items()]
    draft_table = entry_sites(manifest.draft) if drafts_given else {}
    drafts = [read_adapter(name, path, draft_table) for name, path in drafts_given.items()]
    doc = manifest.to_dict()
    entry = doc["models"]["target"]
    with writing(out, True, "add_lora") as tmp:
        for rel in manifest.files:  # unchanged files: hard links (no copy of the weights) where the disk allows
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(out / rel, dst)
            except OSError:
                shutil.copy2(out / rel, dst)
        adapters_doc = dict(manifest.adapters)
        attach(tmp, entry, adapters, table, adapters_doc, say)
        if drafts:
            attach(tmp, doc["models"]["draft"], drafts, draft_table, adapters_doc, say, "draft")
        doc["adapters"] = adapters_doc
        files = dict(manifest.files)
        used = {a[r] for a in adapters_doc.values() for r in ("target", "draft") if a.get(r)}
        for rel in [r for r in files if r.startswith("adapters/") and r not in used]:  # a replaced one's
            del files[rel]
            (tmp / rel).unlink()
        changed = [m["graph"] for m in doc["models"].values()]
        for rel in changed + sorted(used):
            files[rel] = {"sha256": sha256_file(tmp / rel), "size": (tmp / rel).stat().st_size}
        doc["files"] = files
        doc.pop("manifest_sha256", None)
        doc["manifest_sha256"] = manifest_digest(doc)
        parse_manifest(doc)
        (tmp / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    say(f"added {', '.join(a.name for a in adapters)} to {out}")
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
    from edgellm import __version__
    from edgellm.export.source import open_source
    from edgellm.export.tokenizer import check_compatible, tokenizer_files, write_tokenizer
    from edgellm.manifest import FORMAT_VERSION, MANIFEST_NAME, manifest_digest, parse_manifest, sha256_file

    sources = {"target": open_source(target)}
    if draft is not None:
        sources["draft"] = open_source(draft)
    adapters = {role: _read_adapters(opts.lora_of(role), src, say) for role, src in sources.items()}
    max_context, quality, npu_window = opts.max_context, opts.quality, opts.static_window
    say("reading tokenizers")
    toks = {role: tokenizer_files(src, trust_remote_code=opts.trust_remote_code) for role, src in sources.items()}
    if "draft" in sources:
        check_compatible(toks["target"], toks["draft"], sources["target"].spec.vocab_size,
                         sources["draft"].spec.vocab_size)
    tok_entry = write_tokenizer(toks["target"], tmp / "tokenizer")

    qcfg = {role: _quant_config(src, **opts.quant_plan(role)) for role, src in sources.items()}
    vocab = None
    if "draft" in sources and sources["draft"].kind == "hf-generic":
        say("draft: a generic (optimum) graph keeps its whole LM head")
    elif "draft" in sources:
        vocab = opts.vocab.choose(tmp / tok_entry["file"], sources["draft"].spec.vocab_size,
                                 toks["target"].eos_token_ids)
    models, report, manifest_adapters = {}, {"models": {}}, {}
    for role, src in sources.items():
        ctx = min(max_context, src.spec.source_context_length)
        if ctx < max_context:
            warn(f"{role}: max_context={max_context} is more than the model was trained for "
                  f"({src.spec.source_context_length} positions); its bundle uses {ctx}")
        if src.kind == "hf-generic":
            models[role], result = _export_generic_model(tmp, role, src, qcfg[role], ctx, quality, tok_entry, say,
                                                         npu_window)
            if result:
                report["models"][role] = result
            continue
        tokens = vocab[0] if vocab and role == "draft" else None
        if tokens is not None:
            say(f"draft: its LM head keeps the {len(tokens)} most frequent tokens ({vocab[1]['corpus']})")
        models[role] = _export_model(tmp, role, src, qcfg[role], ctx, say, npu_window, tokens)
        if adapters[role][0]:
            from edgellm.export.lora import attach

            attach(tmp, models[role], *adapters[role], manifest_adapters, say, role)
        if tokens is not None:
            write_ids(tmp / vocab[1]["file"], tokens)
            models[role]["draft_vocab"] = vocab[1]
        if npu_window and opts.npu_quant_of(role) != "fp32":
            _quantize_npu(tmp, role, models[role], tok_entry, say, 4 if opts.npu_quant_of(role) == "qdq-w4" else 8,
                          opts.calibration)
        if models[role].get("step_graph"):
            from edgellm.export.shared_weights import share_weights

            saved = share_weights(tmp / models[role]["graph"], tmp / models[role]["step_graph"])
            say(f"{role}: the step graph reads {saved / 1e6:.0f} MB of weights from the window graph's file")
        if quality != "none":
            report["models"][role] = model_quality(tmp, role, src, qcfg[role], models[role], ctx, quality,
                                              tok_entry, say, tokens, adapters[role][0])
    judge(report, opts.max_target_kl, say)
    ort_entry = None
    if opts.ort_mobile:
        from edgellm.export.ort_mobile import write_ort_models

        ort_entry = write_ort_models(tmp, list(models), progress=say)
        for role, entry in models.items():
            entry["ort_graph"] = f"{role}/model.ort"
            if entry.get("step_graph"):
                entry["ort_step_graph"] = f"{role}/step.ort"
    (tmp / "quality.json").write_text(json.dumps(report, indent=2))

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
    if manifest_adapters:
        manifest["adapters"] = manifest_adapters
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
                              "sliding windows, soft-caps or another activation) has no npu graph yet; "
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


