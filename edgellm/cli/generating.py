"""``edgellm generate``, ``chat`` and ``bench``: text from a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgellm.cli import cli, err, generation_flags, generation_options, json_out, load_bundle, load_flags


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message with the chat template.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@generation_flags
def generate(bundle: Path, prompt: str, chat: bool, stop: tuple[str, ...], as_json: bool, **o: Any) -> None:
    """Generate a completion of PROMPT with BUNDLE (streams to the terminal)."""
    options = generation_options(o, stop=stop)
    llm = load_bundle(bundle, o)
    p = [{"role": "user", "content": prompt}] if chat else prompt
    result = None
    for ev in llm.stream_events(p, options):
        if not as_json and ev.text:
            click.echo(ev.text, nl=False)
        result = ev.result or result
    if as_json:
        json_out(result.to_dict())
    else:
        click.echo()
        err(_stats_line(result.stats))


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
@generation_flags
def chat(bundle: Path, system: str | None, **o: Any) -> None:
    """Interactive chat with BUNDLE (empty line or Ctrl-D to quit)."""
    options = generation_options(o)
    llm = load_bundle(bundle, o)
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
            err(f"[the conversation outgrew the context of {llm.manifest.target.max_context} tokens: "
                 f"dropped its {dropped} oldest message(s)]")
        click.echo("assistant> ", nl=False)
        result = None
        for ev in llm.stream_events(messages, options):
            click.echo(ev.text, nl=False)
            result = ev.result or result
        click.echo()
        err(_stats_line(result.stats))
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
@load_flags
@click.option("--json", "as_json", is_flag=True, help="Only the JSON document on stdout.")
def bench(bundle: Path, prompts_file: Path | None, modes: str, as_json: bool, **o: Any) -> None:
    """Benchmark every mode on the same prompts in one process; speedups over target."""
    from edgellm.bench import render_table, run_bench

    report = run_bench(bundle, prompts_file=prompts_file, modes=[m.strip() for m in modes.split(",") if m.strip()],
                       progress=err, **o)
    err(render_table(report))
    json_out(report)
