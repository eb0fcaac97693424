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
      "generation": {"num_draft_tokens": 4, ...},
      "quality_report": "quality.json",
      "files": {"target/model.onnx": {"sha256": "...", "size": 123}, ...}
    }

:func:`read_manifest` validates the document before any session is created; :func:`verify_files`
checks sizes and hashes. Paths must stay inside the bundle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgellm.errors import BundleError, ManifestError

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
_KV_KINDS = {"shared_buffer": _IO_KEYS, "static_window": _STATIC_IO_KEYS}


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
    source: dict[str, Any] = field(default_factory=dict)
    ort_graph: str | None = None  # ORT Mobile copy of ``graph`` (export --ort-mobile)
    step_graph: str | None = None  # npu draft: a one-token static graph beside the window graph
    ort_step_graph: str | None = None

    OPTIONAL_GRAPHS = ("ort_graph", "step_graph", "ort_step_graph")

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("role")
        for k in self.OPTIONAL_GRAPHS:
            if d[k] is None:
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
        }


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
    for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_context"):
        if not isinstance(d[k], int) or d[k] <= 0:
            raise ManifestError(f"models.{role}.{k}: expected a positive integer, got {d[k]!r}")
    kind = d["kv_layout"].get("kind") if isinstance(d["kv_layout"], dict) else None
    if kind not in _KV_KINDS:
        raise ManifestError(f"models.{role}.kv_layout.kind={kind!r}; this runtime reads {', '.join(_KV_KINDS)}")
    io = d["io"]
    if not isinstance(io, dict) or any(k not in io for k in _KV_KINDS[kind]):
        raise ManifestError(f"models.{role}.io: needs the names {', '.join(_KV_KINDS[kind])}")
    if d["kv_layout"].get("dtype", "float32") not in ("float32", "float16"):
        raise ManifestError(f"models.{role}.kv_layout.dtype={d['kv_layout'].get('dtype')!r}; "
                            "this runtime reads float32, float16")
    if kind == "static_window" and not all(isinstance(d["kv_layout"].get(k), (int, float)) for k in ("window", "rope_theta")):
        raise ManifestError(f"models.{role}.kv_layout: a static_window layout needs 'window' and 'rope_theta'")
    if kind == "static_window" and (d["kv_layout"].get("attention_mask") != "indicator"
                                    or not isinstance(d["kv_layout"].get("cache_length"), int)):
        raise ManifestError(f"models.{role}.kv_layout: this npu graph is from an older edgellm (it takes an additive "
                            "mask and concatenates its cache); re-export the bundle")
    safe_relpath(d["graph"], f"models.{role}.graph")
    for k in ModelEntry.OPTIONAL_GRAPHS:
        if d.get(k) is not None:
            safe_relpath(d[k], f"models.{role}.{k}")
    known = set(ModelEntry.__dataclass_fields__) - {"role"}
    return ModelEntry(role=role, **{k: v for k, v in d.items() if k in known})


def parse_manifest(doc: Any) -> Manifest:
    """Validate a manifest document (already JSON-decoded).

    Raises:
        ManifestError: a field is missing, has the wrong type, names a path outside the
            bundle, or ``format_version`` is not one this runtime reads.
    """
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
    safe_relpath(tok["file"], "tokenizer.file")
    if tok.get("chat_template"):
        safe_relpath(tok["chat_template"], "tokenizer.chat_template")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError("manifest: 'files' must list every file with its sha256 and size")
    for rel, meta in files.items():
        safe_relpath(rel, "files")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("size"), int):
            raise ManifestError(f"files[{rel!r}]: expected {{'sha256': str, 'size': int}}, got {meta!r}")
    graphs = [(f"models.{r}.graph", m.graph) for r, m in entries.items()]
    graphs += [(f"models.{r}.{k}", getattr(m, k)) for r, m in entries.items() for k in ModelEntry.OPTIONAL_GRAPHS
               if getattr(m, k)]
    for what, rel in [("tokenizer.file", tok["file"])] + graphs:
        if rel not in files:
            raise ManifestError(f"{what} {rel!r} is not listed in 'files'")
    if "draft" in entries and entries["draft"].vocab_size < int(tok.get("vocab_size", 0)):
        raise ManifestError("models.draft.vocab_size is smaller than the tokenizer's vocabulary")
    return Manifest(
        format_version=version,
        models=entries,
        tokenizer=tok,
        generation=dict(doc.get("generation") or {}),
        files=files,
        edgellm_version=str(doc.get("edgellm_version", "")),
        quality_report=doc.get("quality_report"),
    )


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate ``bundle/manifest.json``.

    Raises:
        BundleError: the folder or the manifest does not exist.
        ManifestError: the manifest is not valid JSON or not a valid manifest.
    """
    if not bundle.exists():
        raise BundleError(f"bundle {str(bundle)!r} does not exist")
    if not bundle.is_dir():
        raise BundleError(f"bundle {str(bundle)!r} is not a folder (expected the folder `edgellm export` wrote)")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{str(bundle)!r} is not an edgellm bundle: no {MANIFEST_NAME}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    return parse_manifest(doc)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(bundle: Path, manifest: Manifest, *, hashes: bool = True) -> list[str]:
    """Check every file the manifest lists. Returns the problems found (empty when intact).

    Args:
        bundle: the bundle folder.
        manifest: its parsed manifest.
        hashes: compare sha256 too (sizes are always compared).
    """
    problems = []
    root = bundle.resolve()
    for rel, meta in manifest.files.items():
        p = (bundle / rel).resolve()
        if root not in p.parents:
            problems.append(f"{rel}: resolves outside the bundle")
            continue
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != meta["size"]:
            problems.append(f"{rel}: size {size} bytes, manifest says {meta['size']} (truncated or replaced)")
        elif hashes and sha256_file(p) != meta["sha256"]:
            problems.append(f"{rel}: sha256 does not match the manifest (modified after export)")
    return problems


def check_bundle(bundle: Path, manifest: Manifest, *, hashes: bool = True) -> None:
    """Raise :class:`BundleError` naming every damaged file, if any."""
    problems = verify_files(bundle, manifest, hashes=hashes)
    if problems:
        raise BundleError(f"bundle {str(bundle)!r} is damaged: " + "; ".join(problems))
