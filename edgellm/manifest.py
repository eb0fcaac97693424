"""The bundle manifest: the contract between the exporter and the runtime.

``manifest.json`` (``format_version`` 1)::

    {
      "format_version": 1,
      "edgellm_version": "0.1.0",
      "models": {
        "target": {
          "graph": "target/model.onnx",              # paths relative to the bundle
          "architecture": "qwen2", "num_layers": 28, "num_heads": 12, "num_kv_heads": 2,
          "head_dim": 128, "hidden_size": 1536,
          "vocab_size": 151936,                      # logits width
          "max_context": 4096,                       # KV buffer length
          "kv_layout": {"kind": "shared_buffer", "dims": ["batch", "num_kv_heads",
                        "max_context", "head_dim"], "dtype": "float32"},
          "io": {"input_ids": "input_ids", "past_key": "past_key_values.%d.key", ...},
          "quantization": {"quant": "int4", "block_size": 32, "accuracy_level": 4, ...},
          "source": {"kind": "gguf", "path": "...", ...}
        },
        "draft": {...}                               # optional
      },
      "tokenizer": {"file": "tokenizer/tokenizer.json", "sha256": "...", "vocab_size": 151665,
                    "eos_token_ids": [151645, 151643], "bos_token_id": null,
                    "chat_template": "tokenizer/chat_template.jinja"},
      "generation": {"max_new_tokens": 256},       # the default length (older bundles list more; unread)
      "quality_report": "quality.json",
      "adapters": {"pirate": {"target": "adapters/pirate.npz", "rank": 8, ...}},   # optional: LoRA
      "files": {"target/model.onnx": {"sha256": "...", "size": 123}, ...}
    }

A target with LoRA branches also has ``"lora": {"sites": {"l0.qkv": [in, out], ...}, "dtype": ...}``
(see ``edgellm/lora.py``).

:func:`parse_manifest` validates the document (:func:`edgellm.bundle.read_manifest` reads it from a
bundle before any session is created; :func:`edgellm.bundle.verify_files` checks sizes and
hashes). Paths must stay inside the bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from edgellm.errors import ManifestError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("target", "draft")
_MODEL_KEYS = ("graph", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "vocab_size", "max_context", "kv_layout", "io", "quantization")
_IO_KEYS = ("input_ids", "num_logits", "seqlens_k", "total_sequence_length", "past_key",
            "past_value", "present_key", "present_value", "logits")
_STATIC_IO_KEYS = ("input_ids", "cos", "sin", "attention_mask", "past_key", "past_value", "present_key",
                   "present_value", "logits")
# cache layouts: shared_buffer = dynamic graph, onnxruntime writes the cache in place (cpu);
# static_window = fixed-shape graph, the runtime writes the cache by position (npu)
# generic (optimum) graphs: past and present are separate tensors (position_ids optional)
_CONCAT_IO_KEYS = ("input_ids", "attention_mask", "past_key", "past_value", "present_key", "present_value", "logits")
_KV_KINDS = {"shared_buffer": _IO_KEYS, "static_window": _STATIC_IO_KEYS, "concat": _CONCAT_IO_KEYS}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the bundle, as the manifest describes it."""

    role: str
    graph: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    kv_layout: dict[str, Any]
    io: dict[str, Any]
    quantization: dict[str, Any]
    hidden_size: int = 0
    intermediate_size: int = 0  # the MLP's width (0: not recorded, in bundles from before LoRA support)
    source: dict[str, Any] = field(default_factory=dict)
    ort_graph: str | None = None  # ORT Mobile copy of ``graph`` (export --ort-mobile)
    step_graph: str | None = None  # npu draft: a one-token static graph beside the window graph
    ort_step_graph: str | None = None
    # a draft whose LM head keeps only frequent tokens: {"size": n, "file": "draft/vocab.i32", "corpus": str}
    draft_vocab: dict[str, Any] | None = None
    # LoRA branches of the graph: {"sites": {"l0.qkv": [in, out], ...}, "dtype": "float32"} (edgellm.export.lora)
    lora: dict[str, Any] | None = None
    # the target's batch graph (edgellm.export.batch_graph): several sequences' passes in one call
    batch_graph: str | None = None
    batch_slots: int = 0  # sequences one call of batch_graph holds (0: no batch graph)

    OPTIONAL_GRAPHS = ("ort_graph", "step_graph", "ort_step_graph", "batch_graph")

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("role")
        for k in self.OPTIONAL_GRAPHS + ("draft_vocab", "lora"):
            if d[k] is None:
                d.pop(k)
        for k in ("hidden_size", "intermediate_size", "batch_slots"):  # 0: not recorded
            if not d[k]:
                d.pop(k)
        return d


@dataclass(frozen=True)
class Manifest:
    """A validated manifest."""

    format_version: int
    models: dict[str, ModelEntry]
    tokenizer: dict[str, Any]
    generation: dict[str, Any]
    files: dict[str, dict[str, Any]]
    edgellm_version: str = ""
    quality_report: str | None = None
    manifest_sha256: str | None = None  # of the document without this field (see manifest_digest)
    integrity: str = "absent"  # "ok": manifest_sha256 matches; "edited": it does not; "absent": not recorded
    # LoRA adapters over the target: {name: {"target": "adapters/name.npz", "rank": r, ...}}
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def target(self) -> ModelEntry:
        return self.models["target"]

    @property
    def draft(self) -> ModelEntry | None:
        return self.models.get("draft")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "edgellm_version": self.edgellm_version,
            "models": {r: m.to_dict() for r, m in self.models.items()},
            "tokenizer": self.tokenizer,
            "generation": self.generation,
            "quality_report": self.quality_report,
            "files": self.files,
        } | ({"adapters": self.adapters} if self.adapters else {}) | (
            {"manifest_sha256": self.manifest_sha256} if self.manifest_sha256 else {})


MAX_CONTEXT = 1 << 20  # KV positions; past this a bundle's caches would not fit any device
# upper bounds far past any decoder that runs on a small device: a manifest past them was edited,
# and believing it would make the runtime allocate without end
_SIZE_LIMITS = {"num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096,
                "vocab_size": 1 << 24, "max_context": MAX_CONTEXT, "hidden_size": 1 << 18,
                "intermediate_size": 1 << 20}
_SHA256 = re.compile(r"[0-9a-f]{64}")
GENERATION_KEYS = {"num_draft_tokens": "int", "max_new_tokens": "int", "temperature": "number", "top_k": "int",
                   "top_p": "number"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _positive_int(x: Any, what: str, hi: int | None = None) -> int:
    if not _is_int(x) or x <= 0 or hi is not None and x > hi:
        raise ManifestError(f"{what}: expected a positive integer{f' up to {hi}' if hi else ''}, got {x!r}")
    return x


def _typed(x: Any, kind: type, what: str, allowed: str) -> Any:
    if not isinstance(x, kind):
        raise ManifestError(f"{what}={x!r}; expected {allowed}")
    return x


def _check_tokenizer(tok: dict[str, Any]) -> None:
    safe_relpath(tok["file"], "tokenizer.file")
    if tok.get("chat_template") is not None:
        safe_relpath(tok["chat_template"], "tokenizer.chat_template")
    if "vocab_size" in tok:
        _positive_int(tok["vocab_size"], "tokenizer.vocab_size", _SIZE_LIMITS["vocab_size"])
    eos = tok.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(_is_int(i) and i >= 0 for i in eos):
        raise ManifestError(f"tokenizer.eos_token_ids={eos!r}; expected a list of token ids (integers >= 0)")
    bos = tok.get("bos_token_id")
    if bos is not None and not (_is_int(bos) and bos >= 0):
        raise ManifestError(f"tokenizer.bos_token_id={bos!r}; expected a token id (integer >= 0) or null")


def _check_generation(gen: Any) -> None:
    """The bundle's generation defaults: known keys of the right type (the runtime validates ranges)."""
    _typed(gen, dict, "generation", "an object")
    for k, v in gen.items():
        kind = GENERATION_KEYS.get(k)
        if kind is None:
            raise ManifestError(f"generation.{k}: unknown; allowed: {', '.join(GENERATION_KEYS)}")
        if not (_is_int(v) if kind == "int" else _is_number(v)):
            raise ManifestError(f"generation.{k}={v!r}; expected {'an integer' if kind == 'int' else 'a number'}")


def manifest_digest(doc: dict[str, Any]) -> str:
    """sha256 of a manifest document without its ``manifest_sha256`` field (canonical JSON).

    The exporter stores it in the manifest, so an edit to any other field is reported by
    ``edgellm inspect`` and refused by ``edgellm.load`` (this is integrity, not authenticity: whoever
    edits the manifest on purpose can recompute it).
    """
    rest = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def safe_relpath(rel: Any, what: str) -> str:
    """Refuse a manifest path that is absolute or climbs out of the bundle."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{what}: expected a relative path string, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or ":" in rel:
        raise ManifestError(f"{what}: path {rel!r} leaves the bundle; only paths inside it are allowed")
    return rel


def _model_entry(role: str, d: Any) -> ModelEntry:
    if not isinstance(d, dict):
        raise ManifestError(f"models.{role}: expected an object, got {type(d).__name__}")
    missing = [k for k in _MODEL_KEYS if k not in d]
    if missing:
        raise ManifestError(f"models.{role}: missing {', '.join(missing)}")
    for k, hi in _SIZE_LIMITS.items():  # all required but hidden_size and intermediate_size
        if k in d:
            _positive_int(d[k], f"models.{role}.{k}", hi)
    _typed(d["architecture"], str, f"models.{role}.architecture", "a string")
    for k in ("quantization", "source"):
        _typed(d.get(k, {}), dict, f"models.{role}.{k}", "an object")
    q = d["quantization"]
    if q.get("block_size") is not None:  # the runtime pads passes by it (matmul_row_multiple)
        _positive_int(q["block_size"], f"models.{role}.quantization.block_size", 1 << 16)
    if q.get("accuracy_level") is not None and (not _is_int(q["accuracy_level"]) or not 0 <= q["accuracy_level"] <= 4):
        raise ManifestError(f"models.{role}.quantization.accuracy_level={q['accuracy_level']!r}; expected 0-4")
    kind = d["kv_layout"].get("kind") if isinstance(d["kv_layout"], dict) else None
    if not isinstance(kind, str) or kind not in _KV_KINDS:
        raise ManifestError(f"models.{role}.kv_layout.kind={kind!r}; this runtime reads {', '.join(_KV_KINDS)}")
    io = d["io"]
    if not isinstance(io, dict) or any(not isinstance(io.get(k), str) or not io[k] for k in _KV_KINDS[kind]):
        raise ManifestError(f"models.{role}.io: needs the names {', '.join(_KV_KINDS[kind])}, each a string")
    for k in ("past_key", "past_value", "present_key", "present_value"):
        if io[k].count("%d") != 1 or "%" in io[k].replace("%d", ""):
            raise ManifestError(f"models.{role}.io.{k}={io[k]!r}: expected a name with one '%d' (the layer)")
    if d["kv_layout"].get("dtype", "float32") not in ("float32", "float16"):  # a tuple: any value compares
        raise ManifestError(f"models.{role}.kv_layout.dtype={d['kv_layout'].get('dtype')!r}; "
                            "this runtime reads float32, float16")
    if kind == "static_window" and not (_is_int(d["kv_layout"].get("window")) and d["kv_layout"]["window"] > 0
                                        and _is_number(d["kv_layout"].get("rope_theta"))
                                        and d["kv_layout"]["rope_theta"] > 0):
        raise ManifestError(f"models.{role}.kv_layout: a static_window layout needs a positive integer 'window' "
                            "and a positive 'rope_theta'")
    if kind == "static_window" and (d["kv_layout"].get("attention_mask") != "indicator"
                                    or not _is_int(d["kv_layout"].get("cache_length"))
                                    or d["kv_layout"]["cache_length"] < d["max_context"]):
        raise ManifestError(f"models.{role}.kv_layout: this npu graph is from an older edgellm (it takes an additive "
                            "mask and concatenates its cache); re-export the bundle")
    safe_relpath(d["graph"], f"models.{role}.graph")
    for k in ModelEntry.OPTIONAL_GRAPHS:
        if d.get(k) is not None:
            safe_relpath(d[k], f"models.{role}.{k}")
    dv = d.get("draft_vocab")
    if dv is not None:
        if role != "draft" or kind != "shared_buffer":
            raise ManifestError(f"models.{role}.draft_vocab: only a draft with a shared_buffer cache has one")
        if not isinstance(dv, dict) or not isinstance(dv.get("file"), str):
            raise ManifestError(f"models.{role}.draft_vocab: expected {{'size': n, 'file': path, ...}}")
        _positive_int(dv.get("size"), f"models.{role}.draft_vocab.size", d["vocab_size"])
        safe_relpath(dv["file"], f"models.{role}.draft_vocab.file")
    if d.get("lora") is not None:
        _check_lora_sites(d["lora"], f"models.{role}.lora", kind)
    if d.get("batch_graph") is not None:
        if role != "target" or kind != "shared_buffer":
            raise ManifestError(f"models.{role}.batch_graph: only a target with a shared_buffer cache has one")
        _positive_int(d.get("batch_slots"), f"models.{role}.batch_slots", 64)
    known = set(ModelEntry.__dataclass_fields__) - {"role"}
    return ModelEntry(role=role, **{k: v for k, v in d.items() if k in known})


#: an adapter's name: what ``generate(adapter=)``, ``--adapter`` and the server's ``model`` field take
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SITE_TAG = re.compile(r"l\d{1,4}\.(qkv|o|gate_up|down)")


def _check_lora_sites(lora: Any, what: str, kind: str) -> None:
    if kind != "shared_buffer":
        raise ManifestError(f"{what}: only a graph with a shared_buffer cache has LoRA branches")
    sites = lora.get("sites") if isinstance(lora, dict) else None
    if not isinstance(sites, dict) or not sites or lora.get("dtype") not in ("float32", "float16"):
        raise ManifestError(f"{what}: expected {{'sites': {{'l0.qkv': [in, out], ...}}, 'dtype': 'float32' or "
                            "'float16'}")
    for tag, dims in sites.items():
        if not _SITE_TAG.fullmatch(tag) or not (isinstance(dims, list) and len(dims) == 2):
            raise ManifestError(f"{what}.sites[{tag!r}]={dims!r}; expected a site like 'l0.qkv' with [in, out]")
        for x in dims:
            _positive_int(x, f"{what}.sites[{tag!r}]", _SIZE_LIMITS["hidden_size"] * 8)


def _check_adapters(adapters: Any, entries: dict[str, ModelEntry]) -> list[tuple[str, str]]:
    """Validate the ``adapters`` block; returns the ``(what, path)`` of each adapter file."""
    _typed(adapters, dict, "adapters", "an object {name: {'target': path, ...}}")
    named = []
    for name, a in adapters.items():
        if not ADAPTER_NAME.fullmatch(name):
            raise ManifestError(f"adapters: name {name!r}; expected letters, digits, '.', '_' or '-' (at most 64)")
        if not isinstance(a, dict) or not isinstance(a.get("target"), str):
            raise ManifestError(f"adapters.{name}: expected an object naming its 'target' file")
        for role in ROLES:
            if a.get(role) is None:
                continue
            if role not in entries or entries[role].lora is None:
                raise ManifestError(f"adapters.{name}.{role}: the {role} graph has no LoRA branches (models.{role}.lora)")
            named.append((f"adapters.{name}.{role}", safe_relpath(a[role], f"adapters.{name}.{role}")))
    return named


def parse_manifest(doc: Any) -> Manifest:
    """Validate a manifest document (already JSON-decoded).

    Raises:
        ManifestError: a field is missing, has the wrong type, names a path outside the
            bundle, or ``format_version`` is not one this runtime reads.
    """
    version = _check_version(doc)
    models = doc.get("models")
    if not isinstance(models, dict) or "target" not in models:
        raise ManifestError("manifest: 'models' must be an object with at least a 'target'")
    unknown = set(models) - set(ROLES)
    if unknown:
        raise ManifestError(f"models: unknown roles {sorted(unknown)}; allowed: {', '.join(ROLES)}")
    entries = {r: _model_entry(r, m) for r, m in models.items()}
    tok = doc.get("tokenizer")
    if not isinstance(tok, dict) or "file" not in tok:
        raise ManifestError("manifest: 'tokenizer' must name its 'file'")
    _check_tokenizer(tok)
    files = _check_files(doc.get("files"))
    digest = doc.get("manifest_sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise ManifestError(f"manifest_sha256={digest!r}; expected 64 hex digits")
    report = doc.get("quality_report")
    if report is not None:
        safe_relpath(report, "quality_report")
    adapters = doc.get("adapters") or {}
    _check_listed(entries, tok, report, adapters, files)
    for r, m in entries.items():
        if m.vocab_size < tok.get("vocab_size", 0):
            raise ManifestError(f"models.{r}.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                                f"vocab_size={tok['vocab_size']}")
    generation = doc.get("generation") or {}
    _check_generation(generation)
    version_str = doc.get("edgellm_version", "")
    _typed(version_str, str, "edgellm_version", "a string")
    return Manifest(
        format_version=version,
        models=entries,
        tokenizer=tok,
        generation=dict(generation),
        files=files,
        edgellm_version=version_str,
        quality_report=report,
        manifest_sha256=digest,
        integrity="absent" if digest is None else ("ok" if manifest_digest(doc) == digest else "edited"),
        adapters=dict(adapters),
    )


def _check_version(doc: Any) -> int:
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"format_version must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"format_version {version} is not supported by this edgellm (reads {FORMAT_VERSION}); "
            "re-export the bundle with this version or upgrade edgellm"
        )
    return version


def _check_files(files: Any) -> dict[str, dict[str, Any]]:
    """The ``files`` table: a safe relative path -> ``{"sha256", "size"}`` for every file but the manifest."""
    if not isinstance(files, dict) or not files:
        raise ManifestError("manifest: 'files' must list every file with its sha256 and size")
    for rel, meta in files.items():
        safe_relpath(rel, "files")
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not _is_int(meta.get("size"))
                or meta["size"] < 0 or not _SHA256.fullmatch(meta["sha256"])):
            raise ManifestError(f"files[{rel!r}]: expected {{'sha256': 64 hex digits, 'size': an integer >= 0}}, "
                                f"got {meta!r}")
        if rel == MANIFEST_NAME:
            raise ManifestError(f"files: {MANIFEST_NAME} cannot list itself; its hash is manifest_sha256")
    return files


def _check_listed(entries: dict[str, ModelEntry], tok: dict[str, Any], report: str | None, adapters: Any,
                  files: dict[str, Any]) -> None:
    """Every file the runtime or inspect opens is listed, so its size and hash are checked and a
    symlink pointing out of the bundle is caught (``verify_files`` resolves each listed path)."""
    named = [(f"models.{r}.graph", m.graph) for r, m in entries.items()]
    named += [(f"models.{r}.{k}", getattr(m, k)) for r, m in entries.items() for k in ModelEntry.OPTIONAL_GRAPHS
              if getattr(m, k)]
    named += [("tokenizer.file", tok["file"])] + ([("tokenizer.chat_template", tok["chat_template"])]
                                                  if tok.get("chat_template") else [])
    named += [("quality_report", report)] if report is not None else []
    named += [(f"models.{r}.draft_vocab.file", m.draft_vocab["file"]) for r, m in entries.items() if m.draft_vocab]
    named += _check_adapters(adapters, entries)
    for what, rel in named:
        if rel not in files:
            raise ManifestError(f"{what} {rel!r} is not listed in 'files' (so its hash cannot be checked)")
