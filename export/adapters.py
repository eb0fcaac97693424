"""Changing an exported bundle without re-exporting it: LoRA adapters (``edgellm add-lora``), a batch graph."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from edgellm.errors import ConfigError, ExportError
from edgellm.export.output import progress_printer, writing
from edgellm.options import DEFAULT_MAX_BATCH


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
    from edgellm.export.lora import entry_sites, parse_lora_args, read_adapter
    from edgellm.export.options import check_draft_lora
    from edgellm.bundle import check_bundle, read_manifest

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
    with writing(out, True, "add_lora") as tmp:
        _link_files(out, tmp, manifest.files)
        _write_with_adapters(tmp, manifest, adapters, table, drafts, draft_table, say)
    say(f"added {', '.join(a.name for a in adapters)} to {out}")
    return out


def _link_files(src: Path, dst: Path, files) -> None:
    """The bundle's files in ``dst``: hard links (no copy of the weights) where the disk allows, else copies."""
    for rel in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, target)
        except OSError:
            shutil.copy2(src / rel, target)


def _write_with_adapters(tmp: Path, manifest, adapters: list, table: dict, drafts: list, draft_table: dict,
                         say) -> None:
    """In the copy ``tmp``: the adapters' files and branches, the files a replaced adapter leaves
    unused removed, and a new manifest hashing what changed."""
    from edgellm.export.lora import attach
    from edgellm.export.pipeline import batch_graph_entry

    doc = manifest.to_dict()
    adapters_doc = dict(manifest.adapters)
    attach(tmp, doc["models"]["target"], adapters, table, adapters_doc, say)
    if drafts:
        attach(tmp, doc["models"]["draft"], drafts, draft_table, adapters_doc, say, "draft")
    doc["adapters"] = adapters_doc
    files = dict(manifest.files)
    used = {a[r] for a in adapters_doc.values() for r in ("target", "draft") if a.get(r)}
    for rel in [r for r in files if r.startswith("adapters/") and r not in used]:  # a replaced one's
        del files[rel]
        (tmp / rel).unlink()
    changed = [m["graph"] for m in doc["models"].values()]
    target = doc["models"]["target"]
    old_batch = target.get("batch_graph")
    if old_batch:  # rebuilt over the graph with its new LoRA inputs
        batch_graph_entry(tmp, target, say, target["batch_slots"])
        if target.get("batch_graph"):
            changed.append(old_batch)
        else:
            del files[old_batch]
            (tmp / old_batch).unlink()
    doc["files"] = files
    write_manifest(tmp, doc, changed + sorted(used))


def write_manifest(tmp: Path, doc: dict, changed: list[str]) -> None:
    """A changed bundle's manifest in ``tmp``: the ``changed`` files hashed anew, the digest
    recomputed, checked by the runtime's own parser before it is written."""
    from edgellm.bundle import sha256_file
    from edgellm.manifest import MANIFEST_NAME, manifest_digest, parse_manifest

    for rel in changed:
        doc["files"][rel] = {"sha256": sha256_file(tmp / rel), "size": (tmp / rel).stat().st_size}
    doc.pop("manifest_sha256", None)
    doc["manifest_sha256"] = manifest_digest(doc)
    parse_manifest(doc)
    (tmp / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))


def add_batch_graph(bundle: str | Path, slots: int = DEFAULT_MAX_BATCH,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Give a bundle exported before batch graphs existed the target's batch graph, without re-exporting it.

    ``edgellm serve`` then verifies the drafts of up to ``slots`` requests in one target pass
    (:mod:`edgellm.export.batch_graph`) instead of one pass each. The bundle is checked first,
    then changed in a copy (hard links for the weights) that replaces it in one rename.

    Args:
        bundle: a bundle folder written by :func:`export`.
        slots: sequences one call of the batch graph holds (``serve --max-batch`` beyond it runs
            several calls a pass).
        progress: called with one-line progress messages.

    Returns:
        The bundle folder.

    Raises:
        ConfigError: ``slots`` outside 2-64.
        ExportError: the target's graph cannot be batched (the message says why).
        BundleError: the bundle is damaged.
    """
    from edgellm.bundle import check_bundle, read_manifest
    from edgellm.export.pipeline import batch_graph_entry

    if not isinstance(slots, int) or isinstance(slots, bool) or not 2 <= slots <= 64:
        raise ConfigError(f"slots={slots!r}; allowed: an integer 2-64 (sequences one target pass holds)",
                          param="slots")
    out = Path(bundle).expanduser()
    say = progress_printer(progress, time.perf_counter())
    manifest = read_manifest(out)
    check_bundle(out, manifest)
    if manifest.target.kv_layout.get("kind") != "shared_buffer":
        raise ExportError(f"{out}: the target's {manifest.target.kv_layout.get('kind')} graph has no batch graph; "
                          "only dynamic (cpu or gpu) exports do")
    with writing(out, True, "add_batch_graph") as tmp:
        _link_files(out, tmp, manifest.files)
        doc = manifest.to_dict()
        reason = batch_graph_entry(tmp, doc["models"]["target"], say, slots)
        if reason is not None:
            raise ExportError(f"{out}: this target's graph cannot be batched: {reason}")
        doc["files"] = dict(manifest.files)
        write_manifest(tmp, doc, [doc["models"]["target"]["batch_graph"]])
    return out
