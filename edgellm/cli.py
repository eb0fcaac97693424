"""The ``edgellm`` command: a thin shell over the Python API (parse -> one call -> render).

Flag names are the API's parameter names with dashes. Errors are mapped at one boundary
(:func:`main`): usage errors exit 2, edgellm errors exit 1 with ``Error: ...``; a traceback
only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from edgellm import options as O
from edgellm.api import DEFAULT_MAX_BATCH
from edgellm.errors import EdgeLLMError
from edgellm.lookup import DEFAULT_SHARED_LOOKUP
from edgellm.options import MODES
from edgellm.prompt_cache import DEFAULT_PROMPT_CACHE
from edgellm.ray_serve import ReplicaOptions


def _json_out(doc: Any) -> None:
    click.echo(json.dumps(doc, ensure_ascii=False, default=str))


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@click.group()
@click.version_option(package_name="edgellm")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgellm: exact speculative decoding on CPUs, phones and small boards."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # one readable line per warning (the default shows the source line of warnings.warn)
        warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _err(f"Warning: {message}")


# ---------------------------------------------------------------------------------- export
def _export_help() -> str:
    from edgellm.export.families import FAMILIES, GGUF_FAMILIES

    return ("Export TARGET (and --draft) into a quantized ONNX bundle.\n\n"
            f"Native graphs (fused attention, GGUF blocks kept) for model types: {', '.join(FAMILIES)}; "
            f"from GGUF files of: {', '.join(GGUF_FAMILIES)}. Other decoders that optimum exports (gpt2, "
            "stablelm, phi, falcon, qwen3_moe, ...) go the generic way: int4/int8/fp32, slower at run time.")


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
    path = _exporter().export(target, draft=draft, output=output, progress=_err, lora=list(lora),
                              draft_lora=list(draft_lora), **opts)
    report = json.loads((path / "quality.json").read_text())
    if as_json:
        _json_out({"bundle": str(path), "quality": report})
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
                                        progress=_err)))


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
        _json_out(summary)
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


# ---------------------------------------------------------------------------------- generate
#: the flags of _gen_options, each a field of edgellm.GenerationOptions
GENERATION_FLAGS = ("mode", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_draft_tokens", "adapter")


def _generation(o: dict[str, Any], **more: Any):
    """The GenerationOptions of a command's flags (taken out of ``o``) and ``more`` fields."""
    from edgellm.generation import GenerationOptions

    return GenerationOptions(**{k: o.pop(k) for k in GENERATION_FLAGS}, **more)


def _gen_options(f):
    opts = [
        click.option("--mode", default=None, type=click.Choice(MODES),
                     help="speculative (default with a draft), target, or lookup (draft-free)."),
        click.option("--max-new-tokens", default=None, type=int,
                     help=f"[default: the bundle's generation.max_new_tokens, {O.DEFAULT_MAX_NEW_TOKENS} as exported]"),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=int),
        click.option("--top-p", default=1.0, show_default=True, type=float),
        click.option("--seed", default=None, type=int),
        click.option("--num-draft-tokens", default=None, type=int, help="Fixed gamma [default: adaptive]."),
        click.option("--adapter", default=None, help="A LoRA adapter of the bundle [default: the base model]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return _load_options(f)


def _load_options(f):
    """The flags of :func:`edgellm.load` every command that loads a bundle takes."""
    opts = [
        click.option("--provider", default="cpu", show_default=True),
        click.option("--draft-provider", default=None),
        click.option("--threads", default=None, type=int),
        click.option("--fallback", is_flag=True, help="Use the CPU when a provider is missing."),
        click.option("--graph-format", default=O.GRAPH_FORMATS[0], show_default=True, type=click.Choice(O.GRAPH_FORMATS),
                     help="ort: the ORT Mobile graphs of a bundle exported with --ort-mobile."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _load(bundle: Path, o: dict[str, Any]):
    import edgellm

    return edgellm.load(bundle, provider=o.pop("provider"), draft_provider=o.pop("draft_provider"),
                        threads=o.pop("threads"), fallback=o.pop("fallback"), graph_format=o.pop("graph_format"))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message with the chat template.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@_gen_options
def generate(bundle: Path, prompt: str, chat: bool, stop: tuple[str, ...], as_json: bool, **o: Any) -> None:
    """Generate a completion of PROMPT with BUNDLE (streams to the terminal)."""
    options = _generation(o, stop=stop)
    llm = _load(bundle, o)
    p = [{"role": "user", "content": prompt}] if chat else prompt
    result = None
    for ev in llm.stream_events(p, options):
        if not as_json and ev.text:
            click.echo(ev.text, nl=False)
        result = ev.result or result
    if as_json:
        _json_out(result.to_dict())
    else:
        click.echo()
        _err(_stats_line(result.stats))


def _stats_line(s: dict[str, Any]) -> str:
    parts = [f"{s['generated_tokens']} tokens", f"mode {s['mode']}"]
    if s.get("tokens_per_second"):
        parts.append(f"{s['tokens_per_second']:.1f} tok/s")
    if s.get("acceptance_rate") is not None:
        parts.append(f"acceptance {s['acceptance_rate']:.2f}")
    if s.get("mean_tokens_per_round"):
        parts.append(f"{s['mean_tokens_per_round']:.2f} tokens/round")
    parts.append(f"first token {1e3 * s['time_to_first_token_s']:.0f} ms")
    return "[" + ", ".join(parts) + "]"


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System message.")
@_gen_options
def chat(bundle: Path, system: str | None, **o: Any) -> None:
    """Interactive chat with BUNDLE (empty line or Ctrl-D to quit)."""
    options = _generation(o)
    llm = _load(bundle, o)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        dropped = _fit_conversation(llm, messages)
        if dropped:
            _err(f"[the conversation outgrew the context of {llm.manifest.target.max_context} tokens: "
                 f"dropped its {dropped} oldest message(s)]")
        click.echo("assistant> ", nl=False)
        result = None
        for ev in llm.stream_events(messages, options):
            click.echo(ev.text, nl=False)
            result = ev.result or result
        click.echo()
        _err(_stats_line(result.stats))
        messages.append({"role": "assistant", "content": result.text})


def _fit_conversation(llm, messages: list[dict[str, str]]) -> int:
    """Drop the oldest turns (never the system message or the newest one) until the conversation
    leaves room for an answer; returns how many messages were dropped."""
    dropped = 0
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) - first > 1 and len(llm.prompt_ids(messages)) + 1 > llm.manifest.target.max_context:
        del messages[first]
        dropped += 1
    return dropped


# ---------------------------------------------------------------------------------- bench
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", default=None, type=click.Path(path_type=Path),
              help="JSONL with {\"prompt\": ...} or {\"messages\": [...]} per line [default: built-in set].")
@click.option("--modes", default="target,speculative,lookup", show_default=True)
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--num-draft-tokens", default=None, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="Sample at this temperature (seeded per run): speed and acceptance; outputs then differ by design.")
@click.option("--adapter", default=None, help="Generate with this LoRA adapter of the bundle [default: the base].")
@_load_options
@click.option("--json", "as_json", is_flag=True, help="Only the JSON document on stdout.")
def bench(bundle: Path, prompts_file: Path | None, modes: str, as_json: bool, **o: Any) -> None:
    """Benchmark every mode on the same prompts in one process; speedups over target."""
    from edgellm.bench import render_table, run_bench

    report = run_bench(bundle, prompts_file=prompts_file, modes=[m.strip() for m in modes.split(",") if m.strip()],
                       progress=_err, **o)
    _err(render_table(report))
    _json_out(report)


# ---------------------------------------------------------------------------------- serve
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 lets phones on the same network in (then a key is required).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="EDGELLM_API_KEY",
              help="Bearer key clients must send [default: none on loopback, generated otherwise].")
@click.option("--mode", default=None, type=click.Choice(MODES), help="Default decoding mode of requests.")
@click.option("--max-batch", default=DEFAULT_MAX_BATCH, show_default=True, type=click.IntRange(1, 64),
              help="Requests generating at once, each in its own cache slot, taking turns round by round.")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(0, 1000),
              help="Requests that may wait while all slots generate; more get HTTP 429.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Another Host name to answer (repeatable; * for any) besides loopback and the bound addresses.")
@click.option("--allowed-origin", "allowed_origins", multiple=True,
              help="A web page origin (http://host:port) allowed to call the API from a browser (repeatable).")
@click.option("--prompt-cache-bytes", default=DEFAULT_PROMPT_CACHE, show_default=True,
              help="Memory for other conversations' KV caches (512M, 2G, bytes; 0: only the last one's), so "
                   "each chat turn prefills only its new message.")
@click.option("--shared-lookup-tokens", default=DEFAULT_SHARED_LOOKUP, show_default=True, type=click.IntRange(0),
              help="Tokens of earlier prompts and answers kept in an n-gram index that proposes for every "
                   "request (0: off).")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run replicas on Ray Serve (local, or the cluster in RAY_ADDRESS) behind Ray's HTTP proxy.")
@click.option("--replicas", default=ReplicaOptions.replicas, show_default=True, type=int,
              help="With --ray: model replicas.")
@click.option("--cpus-per-replica", default=ReplicaOptions.cpus_per_replica, show_default=True, type=float,
              help="With --ray: CPUs Ray reserves per replica (also its threads unless --threads).")
@_load_options
def serve(bundle: Path, on_ray: bool, replicas: int, cpus_per_replica: float, **o: Any) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API, with a chat page at /."""
    if on_ray:
        from edgellm.ray_serve import run

        host, port = o.pop("host"), o.pop("port")
        if o.pop("allowed_origins"):
            raise click.UsageError("--allowed-origin is not supported with --ray")
        run(ReplicaOptions(str(bundle), replicas=replicas, cpus_per_replica=cpus_per_replica,
                           allowed_hosts=tuple(o.pop("allowed_hosts")), **o), host=host, port=port, progress=click.echo)
        return
    ctx = click.get_current_context()
    if any(ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT
           for n in ("replicas", "cpus_per_replica")):
        raise click.UsageError("--replicas and --cpus-per-replica need --ray")
    try:
        from edgellm.server import serve as run_server
    except ImportError as e:
        raise click.ClickException(str(e)) from e
    run_server(str(bundle), progress=click.echo, **o)


# ---------------------------------------------------------------------------------- providers
@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--probe", is_flag=True, help="Run a tiny graph of each bundle kind on each available provider.")
def providers(as_json: bool, probe: bool) -> None:
    """List execution providers: which this onnxruntime has, and where the others run."""
    from edgellm.runtimes.providers import probe_provider, provider_table

    rows = provider_table()
    for r in rows:
        if probe and r["available"]:
            r["bundles"] = probe_provider(r["name"])
    if as_json:
        _json_out(rows)
        return
    for r in rows:
        plugin = f"  [plugin: {r['plugin']}]" if r["plugin"] else ""
        click.echo(f"{r['name']:9} {'available' if r['available'] else 'missing  '}  {r['ort_name']:28} "
                   f"{r['platforms']}{plugin}")
        for kind, state in r.get("bundles", {}).items():
            click.echo(f"{'':11}{kind} bundles: {state}")


# ---------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--cache-dir", default=None, type=click.Path(path_type=Path),
              help="Where models and the bundle are kept [default: ~/.cache/edgellm].")
@click.option("--prompt", default=None, help="Prompt to complete [default: a code prompt].")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--dry-run", is_flag=True, help="Only explain the steps, their disk and time cost.")
def demo(cache_dir: Path | None, prompt: str | None, max_new_tokens: int, dry_run: bool) -> None:
    """The main job: fetch the default pair, export it, generate with speculation, print the speedup."""
    from edgellm.demo import run_demo

    run_demo(cache_dir=cache_dir, prompt=prompt, max_new_tokens=max_new_tokens, dry_run=dry_run, progress=_err)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the one error boundary of the CLI."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="edgellm", standalone_mode=False)
    except click.exceptions.Abort:
        _err("Aborted.")
        return 130
    except click.UsageError as e:
        e.show()
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except EdgeLLMError as e:
        if debug:
            raise
        _err(f"Error: {e}")
        return 1
    except KeyboardInterrupt:
        _err("Interrupted.")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
