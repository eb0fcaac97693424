"""``edgellm bench``: every mode on the same prompts, in one process, interleaved.

Warm-up first; then for each repeat, each prompt, each mode in turn (so machine drift touches
all modes alike). Reports medians and p90 per mode and category, speedups over ``target`` (the
median of per-prompt ratios), and whether each greedy output equals the target's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from edgellm.errors import ConfigError


def load_prompts(path: Path | None) -> list[dict[str, Any]]:
    """Read a JSONL prompt file (``{"prompt": str}`` or ``{"messages": [...]}``, optional ``category``)."""
    if path is None:
        text = resources.files("edgellm").joinpath("data/bench_prompts.jsonl").read_text(encoding="utf-8")
        where = "built-in prompts"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"prompts file {str(p)!r} does not exist")
        text, where = p.read_text(encoding="utf-8"), str(p)
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}:{n}: not valid JSON ({e})") from e
        if not isinstance(doc, dict) or not (isinstance(doc.get("prompt"), str) or isinstance(doc.get("messages"), list)):
            raise ConfigError(f"{where}:{n}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
        prompts.append({"id": doc.get("id", f"p{n}"), "category": doc.get("category", "default"),
                        "prompt": doc.get("prompt", doc.get("messages"))})
    if not prompts:
        raise ConfigError(f"{where}: no prompts")
    return prompts


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def environment(llm) -> dict[str, Any]:
    import numpy
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "edgellm": __import__("edgellm").__version__, "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__, "python": platform.python_version(), "cpu": cpu,
        "cores": os.cpu_count(), "providers": llm.providers,
        "target_quant": llm.manifest.target.quantization,
        "draft_quant": llm.manifest.draft.quantization if llm.manifest.draft else None,
    }


def run_bench(bundle: Path, *, prompts_file: Path | None = None, modes: list[str] | None = None,
              max_new_tokens: int = 128, repeats: int = 3, num_draft_tokens: int | None = None,
              temperature: float = 0.0, provider: str = "cpu", draft_provider: str | None = None, threads: int | None = None,
              adapter: str | None = None, fallback: bool = False, graph_format: str = "onnx",
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the report (see module docstring).

    ``adapter``: every mode generates with this LoRA adapter of the bundle (the draft stays the
    base's: its acceptance on the fine-tune is what the report's ``acceptance_rate`` then says).

    With ``temperature`` > 0 every run samples with seed ``repeat * 1000 + prompt index``; the
    outputs of the modes then differ by design (each draws its own random numbers from the same
    distribution), so ``exact`` is not checked (``None``): the distribution is exact by
    construction and tested statistically (tests/unit/test_speculative.py).
    """
    import edgellm
    from edgellm.generation import GenerationOptions

    say = progress or (lambda m: None)
    modes = modes or ["target", "speculative", "lookup"]
    if "target" not in modes:
        modes = ["target"] + modes  # the baseline always runs
    if repeats < 1:
        raise ConfigError(f"repeats={repeats}; allowed: >= 1")
    # cache_prompt=False: every mode prefills the whole prompt, as in a first request; a bad
    # value fails here, before the bundle loads
    options = GenerationOptions(max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
                                temperature=temperature, cache_prompt=False, adapter=adapter)
    prompts = load_prompts(prompts_file)
    t0 = time.perf_counter()
    llm = edgellm.load(bundle, provider=provider, draft_provider=draft_provider, threads=threads, fallback=fallback,
                       graph_format=graph_format)
    load_s = time.perf_counter() - t0
    llm.check_adapter(adapter)
    if "speculative" in modes and llm.draft is None:
        say("bundle has no draft: skipping mode speculative")
        modes = [m for m in modes if m != "speculative"]
    say("warm-up")
    for mode in modes:
        llm.generate(prompts[0]["prompt"], options, mode=mode, max_new_tokens=16, seed=0)
    runs: list[dict[str, Any]] = []
    for r in range(repeats):
        for i, pr in enumerate(prompts):
            runs += _run_prompt(llm, pr, modes, options, r, seed=r * 1000 + i, say=lambda m: say(
                f"repeat {r + 1}/{repeats} {pr['id']:>10} {m}"))
    return {
        "bundle": str(bundle), "adapter": adapter, "max_new_tokens": max_new_tokens, "repeats": repeats,
        "temperature": temperature,
        "load_s": load_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "environment": environment(llm), "summary": summarize(runs, modes), "runs": runs,
    }


def _run_prompt(llm, pr: dict[str, Any], modes: list[str], options, repeat: int, seed: int,
                say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One prompt in every mode (target first: the others' outputs are compared with its own)."""
    runs, ref, sampled = [], None, options.temperature > 0
    for mode in modes:
        res = llm.generate(pr["prompt"], options, mode=mode, seed=seed)
        if mode == "target":
            ref = res.token_ids
        s = res.stats
        exact = None if sampled else res.token_ids == ref
        tie = None if exact in (None, True) else near_tie(llm, pr["prompt"], ref, res.token_ids)
        runs.append({"repeat": repeat, "prompt": pr["id"], "category": pr["category"], "mode": mode,
                     "exact": exact, "divergence": tie, **s})
        say(f"{mode:11} {s['tokens_per_second'] or 0:6.1f} tok/s"
            + (f"  acceptance {s['acceptance_rate']:.2f}" if s.get("acceptance_rate") is not None else ""))
    return runs


def near_tie(llm, prompt, ref: list[int], other: list[int]) -> dict[str, Any]:
    """Where ``other`` first leaves the target-mode output ``ref``, and the target's logit margin there.

    The target computes every position alike whether it decodes alone or verifies a draft
    (see :class:`edgellm.runtimes.session.DecoderSession`, ``min_rows``), so outputs should not
    differ at all. Should they (another provider, other kernels), this says where and by how
    much: within ~0.1 logit either token is the target's choice up to float rounding ("near
    tie"); a large margin would mean a real bug.
    """
    import numpy as np

    i = next((k for k in range(min(len(ref), len(other))) if ref[k] != other[k]), min(len(ref), len(other)))
    if i >= min(len(ref), len(other)):
        return {"position": i, "margin": None, "near_tie": False}
    ids = llm.prompt_ids(prompt) + ref[:i]
    llm.target.rollback(0)
    logits = llm.target.forward(np.asarray(ids, np.int64), 1)[-1]
    margin = float(abs(logits[ref[i]] - logits[other[i]]))
    return {"position": i, "margin": margin, "near_tie": margin < NEAR_TIE_LOGITS}


NEAR_TIE_LOGITS = 0.1


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    """Per mode and category (and ``all``): medians, p90, speedup over target, exactness."""
    rows = []
    cats = sorted({r["category"] for r in runs})
    for cat in cats + ["all"]:
        sel = [r for r in runs if cat == "all" or r["category"] == cat]
        base = {(r["repeat"], r["prompt"]): r["tokens_per_second"] for r in sel if r["mode"] == "target"}
        for mode in modes:
            rs = [r for r in sel if r["mode"] == mode and r["tokens_per_second"]]
            if not rs:
                continue
            tps = [r["tokens_per_second"] for r in rs]
            ratios = [r["tokens_per_second"] / base[(r["repeat"], r["prompt"])] for r in rs
                      if base.get((r["repeat"], r["prompt"]))]
            acc = [r["acceptance_rate"] for r in rs if r["acceptance_rate"] is not None]
            mtpr = [r["mean_tokens_per_round"] for r in rs if r["mean_tokens_per_round"]]
            draft_ms = [r["draft_ms_per_round"] for r in rs if r["draft_ms_per_round"] is not None]
            verify_ms = [r["verify_ms_per_round"] for r in rs if r["verify_ms_per_round"] is not None]
            rows.append({
                "category": cat, "mode": mode, "n": len(rs),
                "tokens_per_second": statistics.median(tps), "tokens_per_second_p90": _p90(tps),
                "speedup": statistics.median(ratios) if ratios else None,
                "time_to_first_token_ms": 1e3 * statistics.median(r["time_to_first_token_s"] for r in rs),
                "acceptance_rate": statistics.median(acc) if acc else None,
                "mean_tokens_per_round": statistics.median(mtpr) if mtpr else None,
                "draft_ms_per_round": statistics.median(draft_ms) if draft_ms else None,
                "verify_ms_per_round": statistics.median(verify_ms) if verify_ms else None,
                "target_ms_per_step": statistics.median(r["target_ms_per_step"] for r in rs) if mode == "target" else None,
                "exact": None if any(r["exact"] is None for r in rs) else all(r["exact"] for r in rs),
                "near_ties": sum(1 for r in rs if r["divergence"] and r["divergence"]["near_tie"]),
                "real_mismatches": sum(1 for r in rs if r["divergence"] and not r["divergence"]["near_tie"]),
            })
    return rows


def render_table(report: dict[str, Any]) -> str:
    head = f"{'category':10} {'mode':12} {'tok/s':>7} {'p90':>7} {'speedup':>8} {'ttft ms':>8} {'accept':>7} " \
           f"{'tok/rnd':>8} {'draft ms':>9} {'verify ms':>9} exact"
    lines = [head, "-" * len(head)]
    fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
    for r in report["summary"]:
        lines.append(
            f"{r['category']:10} {r['mode']:12} {r['tokens_per_second']:7.1f} {r['tokens_per_second_p90']:7.1f} "
            f"{fmt(r['speedup'], '%7.2fx'):>8} {r['time_to_first_token_ms']:8.0f} {fmt(r['acceptance_rate'], '%.2f'):>7} "
            f"{fmt(r['mean_tokens_per_round'], '%.2f'):>8} {fmt(r['draft_ms_per_round'], '%.1f'):>9} "
            f"{fmt(r['verify_ms_per_round'], '%.1f'):>9} "
            + ("sampled" if r["exact"] is None else "yes" if r["exact"]
               else f"near-tie x{r['near_ties']}" if not r["real_mismatches"] else "NO")
        )
    lines.append(f"load {report['load_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB, "
                 f"{report['environment']['cpu']}, {report['environment']['cores']} cores")
    return "\n".join(lines)
