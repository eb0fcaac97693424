"""``edgellm export``, ``add-lora``, ``add-batch-graph`` and ``inspect``: making and checking bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgellm import options as O
from edgellm.cli import cli, err, json_out
from edgellm.errors import EdgeLLMError


# ---------------------------------------------------------------------------------- export
def _export_help() -> str:
    from edgellm.export.families import FAMILIES, GGUF_FAMILIES

    return ("Export TARGET (and --draft) into a quantized ONNX bundle.\n\n"
            f"Native graphs (fused attention, GGUF blocks kept) for model types: {', '.join(FAMILIES)}; "
            f"from GGUF files of: {', '.join(GGUF_FAMILIES)}. Other decoders that optimum exports (gpt2, "
            "stablelm, phi, falcon, gpt_neox, ...) go the generic way: int4/int8/fp32, slower at run time.")


@cli.command(help=_export_help())
@click.argument("target")
@click.option("--draft", default=None, help="Draft model: HF folder, .gguf file or hub id (same tokenizer).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--quant", default=O.DEFAULT_QUANT, show_default=True, type=click.Choice(O.EXPORT_QUANTS),
              help="Target weights. gguf: keep a GGUF file's own quantized blocks exactly; auto: gguf for a "
                   ".gguf target, else int4.")
@click.option("--draft-quant", default=O.DEFAULT_DRAFT_QUANT, show_default=True, type=click.Choice(O.EXPORT_QUANTS))
@click.option("--block-size", default=O.DEFAULT_BLOCK_SIZE, show_default=True, type=int,
              help="Target MatMulNBits block size.")
@click.option("--draft-block-size", default=O.DEFAULT_DRAFT_BLOCK_SIZE, show_default=True, type=int)
@click.option("--lm-head-quant", default=None, type=click.Choice(O.QUANTS),
              help="Target output projection [default: int8 when --quant int4, else --quant].")
@click.option("--draft-lm-head-quant", default=None, type=click.Choice(O.QUANTS),
              help="Draft output projection [default: int8 when --draft-quant int4, else --draft-quant].")
@click.option("--max-context", default=O.DEFAULT_MAX_CONTEXT, show_default=True, type=int, help="KV cache length.")
@click.option("--quality", default=O.DEFAULT_QUALITY, show_default=True, type=click.Choice(O.QUALITY_LEVELS),
              help="quant: quantized vs fp32 graph; full: also fp32 graph vs the source model (torch).")
@click.option("--max-target-kl", default=O.DEFAULT_MAX_TARGET_KL, show_default=True, type=float,
              help="Warn when the target's quantization costs more than this mean KL (nats).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output bundle.")
@click.option("--trust-remote-code", is_flag=True, help="Let transformers run code shipped with the model.")
@click.option("--target-device", default=O.TARGET_DEVICES[0], show_default=True, type=click.Choice(O.TARGET_DEVICES),
              help="gpu: fp16 graphs (int4 weights) for GPU providers; npu: static-shape graphs of "
                   "standard operators (fp32 or --npu-quant qdq) for NPU providers.")
@click.option("--npu-window", default=O.DEFAULT_NPU_WINDOW, show_default=True, type=int,
              help="Tokens per call of the npu graphs (a verify pass holds up to this many).")
@click.option("--npu-quant", default=O.NPU_QUANTS[0], show_default=True, type=click.Choice(O.NPU_QUANTS),
              help="qdq: static QDQ quantization of the npu graphs (uint16 activations, uint8 weights), "
                   "calibrated on sample text; qdq-w4: int4 weights.")
@click.option("--calibration-text", type=click.Path(exists=True, dir_okay=False),
              help="Text file to calibrate QDQ graphs on [default: edgellm's sample text].")
@click.option("--npu-draft-quant", default=None, type=click.Choice(O.NPU_QUANTS),
              help="The draft's --npu-quant [default: --npu-quant].")
@click.option("--draft-vocab", default=None, type=int,
              help="Tokens the draft's LM head keeps, the most frequent ones: a cheaper draft step, the same "
                   f"output [default: {O.DEFAULT_DRAFT_VOCAB}; 0: all].")
@click.option("--draft-vocab-corpus", type=click.Path(exists=True, dir_okay=False),
              help="Text file to count token frequencies over [default: Python's standard library source].")
@click.option("--ort-mobile", is_flag=True,
              help="Also write .ort graphs and required_operators.config (apps with a minimal onnxruntime).")
@click.option("--lora", multiple=True, metavar="NAME=PATH",
              help="A PEFT LoRA adapter over the target, selected per request by NAME (repeatable).")
@click.option("--draft-lora", multiple=True, metavar="NAME=PATH",
              help="A LoRA adapter over the draft that goes with the target's adapter NAME (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def export(target: str, draft: str | None, output: Path, as_json: bool, lora: tuple[str, ...],
           draft_lora: tuple[str, ...], **opts: Any) -> None:
    path = _exporter().export(target, draft=draft, output=output, progress=err, lora=list(lora),
                              draft_lora=list(draft_lora), **opts)
    report = json.loads((path / "quality.json").read_text())
    if as_json:
        json_out({"bundle": str(path), "quality": report})
    else:
        click.echo(str(path))


def _exporter():
    try:
        import edgellm.export as exporter
    except ImportError as e:
        raise EdgeLLMError(f"the exporter needs the export extra: pip install 'edgellm[export]' ({e})") from e
    return exporter


@cli.command("add-lora")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, metavar="NAME=PATH...")
@click.option("--draft-lora", multiple=True, metavar="NAME=PATH",
              help="A LoRA adapter over the draft that goes with the adapter NAME (repeatable).")
@click.option("--replace", is_flag=True, help="Replace adapters the bundle has under the same names.")
def add_lora(bundle: Path, adapters: tuple[str, ...], draft_lora: tuple[str, ...], replace: bool) -> None:
    """Add PEFT LoRA adapters to BUNDLE (no re-export; the base model is not needed)."""
    click.echo(str(_exporter().add_lora(bundle, list(adapters), replace=replace, draft_lora=list(draft_lora),
                                        progress=err)))


@cli.command("add-batch-graph")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--slots", default=O.DEFAULT_MAX_BATCH, show_default=True, type=click.IntRange(2, 64),
              help="Sequences one target pass holds (2-64).")
def add_batch_graph(bundle: Path, slots: int) -> None:
    """Give BUNDLE (exported before batch graphs) the target's batch graph: `serve` then verifies
    several requests' drafts in one pass. No re-export; the base model is not needed."""
    click.echo(str(_exporter().add_batch_graph(bundle, slots=slots, progress=err)))


# ---------------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-verify", "--no-hashes", "no_verify", is_flag=True, help="Compare sizes only, not sha256 (fast).")
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: Path, no_verify: bool, as_json: bool) -> None:
    """Validate BUNDLE's manifest and file hashes and summarize it."""
    from edgellm.inspect import inspect_bundle

    summary = inspect_bundle(bundle, verify=not no_verify)
    if as_json:
        json_out(summary)
    else:
        _print_summary(summary)
    if summary["problems"]:
        raise EdgeLLMError(f"bundle {str(bundle)!r} is damaged: " + "; ".join(summary["problems"]))


def _print_summary(s: dict[str, Any]) -> None:
    click.echo(f"bundle {s['bundle']} (format_version {s['format_version']}, edgellm {s['edgellm_version']})")
    for role, m in s["models"].items():
        q = m["quantization"]
        click.echo(f"  {role}: {m['architecture']} {m['num_layers']} layers, vocab {m['vocab_size']}, "
                   f"max_context {m['max_context']}, {m['device']}, {q.get('quant', '?')}"
                   + (f" (block {q['block_size']})" if q.get("block_size") else "") + f", {m['size_mb']:.0f} MB"
                   + (", generic graph (optimum)" if q.get("export_path") == "generic" else ""))
        click.echo(f"    graphs: {', '.join(m['graphs'])}")
        if q.get("experts"):
            click.echo(f"    mixture of experts: {q['experts']}")
        if m.get("draft_vocab"):
            click.echo(f"    LM head: the {m['draft_vocab']['size']} most frequent tokens ({m['draft_vocab']['corpus']})")
        if m.get("quality"):
            click.echo(f"    quality vs fp32: top-1 {m['quality']['top1_agreement']:.3f}, "
                       f"mean KL {m['quality']['mean_kl']:.4f}")
    for name, a in s.get("adapters", {}).items():
        q = a.get("quality")
        click.echo(f"  adapter {name}: LoRA rank {a.get('rank')} on {', '.join(a.get('target_modules', []))}"
                   + (f", quality vs fp32: top-1 {q['top1_agreement']:.3f}, mean KL {q['mean_kl']:.4f}" if q else ""))
    click.echo(f"  tokenizer: {s['tokenizer']['vocab_size']} tokens, eos {s['tokenizer']['eos_token_ids']}")
    click.echo(f"  files: {s['files']} checked ({'sha256' if s['hashes_checked'] else 'sizes only'}), "
               f"{'OK' if not s['problems'] else str(len(s['problems'])) + ' problem(s)'}")
    click.echo("  manifest: " + {"ok": "matches its manifest_sha256",
                                 "edited": "EDITED after export (does not match its manifest_sha256)",
                                 "absent": "no manifest_sha256 (exported by an older edgellm): edits to it cannot "
                                           "be detected; re-export to add one"}[s["manifest_integrity"]])
