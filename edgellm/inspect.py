"""``edgellm inspect``: validate a bundle and summarize it, without creating sessions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellm.bundle import read_manifest, verify_files


def _device(e) -> str:
    """The export device a model entry was written for: cpu, gpu (fp16) or npu (static window)."""
    if e.kv_layout.get("kind") == "static_window":
        return f"npu (static, window {e.kv_layout.get('window')})"
    return "gpu (fp16)" if e.kv_layout.get("dtype") == "float16" else "cpu"


def inspect_bundle(bundle: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Validate the manifest and files of ``bundle``; return a summary with ``problems``.

    Raises:
        BundleError / ManifestError: no bundle there, or its manifest is invalid.
    """
    path = Path(bundle).expanduser()
    m = read_manifest(path)
    problems = verify_files(path, m, verify=verify)
    quality = _quality_models(path, m.quality_report, problems)
    models = {}
    for role, e in m.models.items():
        prefix = e.graph.rsplit("/", 1)[0] + "/"
        size = sum(meta["size"] for rel, meta in m.files.items() if rel.startswith(prefix))
        models[role] = {
            "architecture": e.architecture, "num_layers": e.num_layers, "num_heads": e.num_heads,
            "num_kv_heads": e.num_kv_heads, "head_dim": e.head_dim, "vocab_size": e.vocab_size,
            "max_context": e.max_context, "quantization": e.quantization, "source": e.source,
            "size_mb": size / 1e6,
            "graphs": [g for g in (e.graph, e.step_graph, e.ort_graph, e.ort_step_graph) if g],
            "device": _device(e),
            "quality": _score(quality.get(role)),
            "draft_vocab": e.draft_vocab,
        }
    return {
        "bundle": str(path),
        "format_version": m.format_version,
        "edgellm_version": m.edgellm_version,
        "models": models,
        "tokenizer": {k: m.tokenizer.get(k) for k in ("vocab_size", "eos_token_ids", "bos_token_id", "fingerprint")},
        "adapters": {name: {k: v for k, v in a.items() if k in ("rank", "alpha", "target_modules", "sites")}
                     | {"quality": _score((quality.get("target") or {}).get("adapters", {}).get(name))}
                     for name, a in m.adapters.items()},
        "files": len(m.files),
        "hashes_checked": verify,
        "manifest_integrity": m.integrity,
        "problems": problems,
    }


def _quality_models(bundle: Path, rel: str | None, problems: list[str]) -> dict[str, Any]:
    """The ``models`` part of the quality report, or ``{}`` (with a problem noted) when unreadable.

    ``rel`` was checked by the manifest parser (inside the bundle, listed in ``files``), and
    :func:`verify_files` has resolved it inside the bundle or reported it.
    """
    if not rel:
        return {}
    p = bundle / rel
    root = bundle.resolve()
    if not p.is_file() or root not in p.resolve().parents:
        return {}  # already reported by verify_files (missing, or outside the bundle)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        problems.append(f"{rel}: the quality report is not a readable JSON file")
        return {}
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        problems.append(f"{rel}: the quality report is not an object with 'models'")
        return {}
    return models


def _score(report: Any) -> dict[str, Any] | None:
    """The graph-vs-fp32 score of one model's quality report, when it has a well-formed one."""
    if not isinstance(report, dict):
        return None
    score = report.get("quantized_vs_fp32") or report.get("npu_graph_vs_fp32")
    ok = isinstance(score, dict) and all(isinstance(score.get(k), (int, float)) for k in ("top1_agreement", "mean_kl"))
    return score if ok else None
