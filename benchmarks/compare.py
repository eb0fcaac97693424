"""edgellm against the engines users would pick instead, on the same prompts and the same CPU.

    .venv/bin/python benchmarks/compare.py [--repeats 2] [--max-new-tokens 128] [--per-category 2]

Engines (each in its own process, see ``peers.py``; one that cannot be started is reported as
skipped with the reason):

- edgellm: target alone, speculative (0.5B draft), lookup; and speculative with a fixed number
  of draft tokens 1-8 on the code prompts (the draft-length sweep);
- llama.cpp's own binaries (built from the source vendored in the llama-cpp-python sdist) on the
  original GGUF files: plain decoding (``llama-completion``), draft-model speculation with the
  0.5B GGUF (``llama-speculative-simple --spec-type draft-simple``, 4, 8 and 16 draft tokens), its
  n-gram speculation (``--spec-type ngram-simple``) and ``llama-lookup``;
- llama-cpp-python (the binding) on the same files: target alone, its prompt lookup;
- onnxruntime-genai with the int4 models its own builder made from the same weights: plain
  decoding, its draft-model speculation (4, 8 and adaptive draft tokens) and its n-gram mode;
- Hugging Face transformers on PyTorch (fp32, the dequantized GGUF): target alone, assisted
  generation with the 0.5B draft, prompt lookup.

All greedy, the same prompt token ids, the same thread count, interleaved: for each repeat and
prompt every (engine, mode) runs once, in an order rotated from prompt to prompt, so machine
drift touches all alike. Writes ``results/<date>-peers.json`` and two PNGs, prints a table on
stderr and, last on stdout, one JSON document.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm"))
PEERS = Path(os.environ.get("EDGELLM_PEERS", ROOT / ".peers"))  # made by benchmarks/setup_peers.sh
SWEEP = [f"speculative@{k}" for k in (1, 2, 3, 4, 6, 8)]


def say(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


class Worker:
    """One engine process speaking JSON lines."""

    def __init__(self, name: str, python: Path, args: list[str], threads: int, engine: str | None = None) -> None:
        self.name, self.info, self.peak_rss_mb = name, {}, None
        engine = engine or name
        if not python.exists():
            self.info = {"skipped": f"{python} not found (run benchmarks/setup_peers.sh)"}
            self.proc = None
            return
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([str(python), str(HERE / "peers.py"), engine, "--threads", str(threads), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        self.info = json.loads(line) if line else {"skipped": f"{name} exited while loading"}
        if "skipped" in self.info:
            self.proc.wait()
            self.proc = None

    def run(self, ids: list[int], mode: str, max_new: int) -> dict[str, Any] | None:
        """One generation; ``None`` (and the engine marked failed) when the process died."""
        try:
            self.proc.stdin.write(json.dumps({"ids": ids, "mode": mode, "max_new_tokens": max_new}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            line = ""
        if not line:
            self.info["failed"] = f"the {self.name} process died during mode {mode} (exit {self.proc.wait()})"
            self.proc = None
            return None
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.write('{"quit": true}\n')
            self.proc.stdin.flush()
            self.peak_rss_mb = json.loads(self.proc.stdout.readline())["peak_rss_mb"]
            self.proc.wait()


def load_prompts(tokenizer, per_category: int) -> list[dict[str, Any]]:
    prompts = []
    for cat in ("code", "edit", "chat"):
        lines = (HERE / "prompts" / f"{cat}.jsonl").read_text().splitlines()
        for line in [x for x in lines if x.strip()][:per_category]:
            doc = json.loads(line)
            text = doc.get("prompt") or tokenizer.apply_chat_template(doc["messages"])
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"id": doc["id"], "category": cat, "ids": ids})
    return prompts


def start_workers(a: argparse.Namespace) -> list[Worker]:
    main_py = Path(sys.executable)
    specs = [  # (name in the table, engine, python, arguments)
        ("edgellm", "edgellm", main_py, ["--bundle", str(a.bundle)] + (["--no-sweep"] if a.no_sweep else [])),
        ("llama.cpp", "llama.cpp-bin", main_py, ["--llama-bin", str(a.llama_bin), "--target-gguf", str(a.target_gguf),
                                                 "--draft-gguf", str(a.draft_gguf), "--bundle", str(a.bundle)]),
        ("llama-cpp-python", "llama.cpp", PEERS / "llamacpp/bin/python", ["--target-gguf", str(a.target_gguf)]),
        ("onnxruntime-genai", "onnxruntime-genai", PEERS / "genai/bin/python",
         ["--genai-target", str(a.genai_target), "--genai-draft", str(a.genai_draft)]),
        ("transformers", "transformers", main_py, ["--hf-target", str(a.hf_target), "--hf-draft", str(a.hf_draft)]),
    ]
    for spec in a.extra_bundle:  # e.g. int4=path: the same engine on another bundle, without the sweep
        label, _, path = spec.partition("=")
        specs.insert(1, (f"edgellm {label}", "edgellm", main_py, ["--bundle", path, "--no-sweep"]))
    workers = []
    for name, engine, py, args in specs:
        if engine not in a.engines:
            continue
        say(f"starting {name} ...")
        w = Worker(name, py, args, a.threads, engine=engine)
        say(f"  {w.info.get('skipped') or w.info.get('version')}")
        workers.append(w)
    return workers


def run_all(workers: list[Worker], prompts: list[dict[str, Any]], a: argparse.Namespace) -> list[dict[str, Any]]:
    live = [w for w in workers if w.proc is not None]
    in_sweep = lambda w, m: w.name == "edgellm" and m in SWEEP  # noqa: E731 - the sweep runs on code prompts only
    pairs = [(w, m) for w in live for m in w.info["modes"] if not in_sweep(w, m)]
    sweep = [(w, m) for w in live for m in w.info["modes"] if in_sweep(w, m)]
    for w, m in pairs + sweep:  # warm-up
        if w.proc is not None:
            w.run(prompts[0]["ids"], m, 8)
    runs = []
    for rep in range(a.repeats):
        for i, p in enumerate(prompts):
            todo = pairs + (sweep if p["category"] == "code" else [])
            shift = (rep * len(prompts) + i) % len(todo)
            for w, m in todo[shift:] + todo[:shift]:
                r = w.run(p["ids"], m, a.max_new_tokens) if w.proc is not None else None
                if r is None:
                    continue
                runs.append({"engine": w.name, "mode": m, "prompt": p["id"], "category": p["category"],
                             "repeat": rep, **r})
                say(f"  rep {rep} {p['id']:16} {w.name:17} {m:15} {len(r['tokens']):4} tok "
                    f"{r['decode_tps'] or 0:6.1f} tok/s  ttft {r['ttft_s']:.2f} s")
    return runs


def same_output(a: list[int], b: list[int] | None, retokenized: bool = False) -> bool:
    """Whether an output equals the engine's own target output.

    Token for token; for an engine whose output is text re-tokenized here (llama.cpp's binaries),
    the last token of the shorter output may differ (a word cut at the token limit tokenizes
    otherwise) and the lengths by one (llama-speculative-simple stops one token late).
    """
    if b is None:
        return False
    if not retokenized:
        return a == b
    n = min(len(a), len(b))
    return abs(len(a) - len(b)) <= 1 and a[: n - 1] == b[: n - 1]


def summarize(runs: list[dict[str, Any]], workers: list[Worker]) -> dict[str, Any]:
    own_target = {(r["engine"], r["prompt"], r["repeat"]): r["tokens"] for r in runs if r["mode"] == "target"}
    retokenized = {w.name for w in workers if w.info.get("retokenized")}
    rows = {}
    for r in runs:
        key = (r["engine"], r["mode"], r["category"])
        row = rows.setdefault(key, {"engine": r["engine"], "mode": r["mode"], "category": r["category"],
                                    "tps": [], "ttft": [], "same": [], "acceptance": []})
        row["tps"].append(r["decode_tps"] or 0.0)
        row["ttft"].append(r["ttft_s"])
        row["same"].append(same_output(r["tokens"], own_target.get((r["engine"], r["prompt"], r["repeat"])),
                                       r["engine"] in retokenized))
        if r.get("acceptance") is not None:
            row["acceptance"].append(r["acceptance"])
    table = []
    for row in rows.values():
        base = rows.get((row["engine"], "target", row["category"]))
        med = statistics.median(row["tps"])
        table.append({"engine": row["engine"], "mode": row["mode"], "category": row["category"],
                      "decode_tps": med, "ttft_s": statistics.median(row["ttft"]),
                      "speedup_vs_own_target": med / statistics.median(base["tps"]) if base else None,
                      "equals_own_target": sum(row["same"]) / len(row["same"]),
                      "acceptance": statistics.median(row["acceptance"]) if row["acceptance"] else None,
                      "runs": len(row["tps"])})
    engines = {w.name: {"version": w.info.get("version"), "skipped": w.info.get("skipped") or w.info.get("failed"),
                        "skipped_modes": w.info.get("skipped_modes", {}), "peak_rss_mb": w.peak_rss_mb}
               for w in workers}
    return {"table": table, "best": best_modes(table), "engines": engines}


def best_modes(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per category, each engine's fastest mode among those whose every output equals its own target's
    (a mode that changes the output does not count as anyone's best, edgellm's included), and every
    edgellm engine's best over each peer's best."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in table:
        if r["equals_own_target"] < 1.0:
            continue
        key = (r["category"], r["engine"])
        if key not in best or r["decode_tps"] > best[key]["decode_tps"]:
            best[key] = r
    out = []
    for (cat, engine), r in sorted(best.items()):
        row = {"category": cat, "engine": engine, "best_mode": r["mode"], "decode_tps": r["decode_tps"],
               "equals_own_target": r["equals_own_target"]}
        if engine.startswith("edgellm"):
            row["over_peers"] = {peer: r["decode_tps"] / b["decode_tps"] for (c, peer), b in best.items()
                                 if c == cat and not peer.startswith("edgellm")}
        out.append(row)
    return out


def render(summary: dict[str, Any]) -> str:
    lines = [f"{'engine':18} {'mode':15} {'category':8} {'tok/s':>6} {'x own':>6} {'ttft s':>7} {'same':>5} {'acc':>5}"]
    for r in sorted(summary["table"], key=lambda r: (r["category"], -r["decode_tps"])):
        sp = f"{r['speedup_vs_own_target']:.2f}" if r["speedup_vs_own_target"] else "-"
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        lines.append(f"{r['engine']:18} {r['mode']:15} {r['category']:8} {r['decode_tps']:6.1f} {sp:>6} "
                     f"{r['ttft_s']:7.2f} {r['equals_own_target']:5.2f} {acc:>5}")
    lines.append("best modes (outputs equal to the own target's):")
    for r in summary.get("best", []):
        over = ", ".join(f"{v:.2f}x {k}" for k, v in r.get("over_peers", {}).items())
        lines.append(f"  {r['category']:6} {r['engine']:18} {r['best_mode']:15} {r['decode_tps']:6.1f}"
                     + (f"  ({over})" if over else ""))
    for name, e in summary["engines"].items():
        if e["skipped"]:
            lines.append(f"skipped {name}: {e['skipped']}")
        for mode, why in e["skipped_modes"].items():
            lines.append(f"skipped {name} {mode}: {why}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], out_dir: Path, stamp: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in summary["table"] if r["mode"] not in SWEEP]
    cats = ["code", "edit", "chat"]
    series = sorted({(r["engine"], r["mode"]) for r in table}, key=lambda s: (s[0] != "edgellm", s))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(series)
    colors = plt.cm.tab20.colors
    for j, (eng, mode) in enumerate(series):
        vals = [next((r["decode_tps"] for r in table if (r["engine"], r["mode"], r["category"]) == (eng, mode, c)), 0)
                for c in cats]
        bars = ax.bar([i + j * width for i in range(len(cats))], vals, width, label=f"{eng} {mode}",
                      color=colors[j % len(colors)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats)
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title(f"Qwen2.5-Coder 1.5B (+0.5B draft), greedy, 2 threads, CPU — {stamp}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [out_dir / "peers-tokens-per-second.png"]
    fig.savefig(paths[0], dpi=120)

    sweep = {r["mode"]: r for r in summary["table"] if r["engine"] == "edgellm" and r["category"] == "code"}
    if all(m in sweep for m in SWEEP):
        ks = [int(m.split("@")[1]) for m in SWEEP]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(ks, [sweep[m]["decode_tps"] for m in SWEEP], "o-", label="tokens/s (fixed draft length)")
        for mode, style in (("speculative", "--"), ("target", ":")):
            ax.axhline(sweep[mode]["decode_tps"], ls=style, color="gray", label=f"tokens/s, {mode}"
                       + (" (adaptive)" if mode == "speculative" else " alone"))
        ax.set_xlabel("draft tokens per round")
        ax.set_ylabel("decode tokens/s (median)")
        ax2 = ax.twinx()
        ax2.plot(ks, [sweep[m]["acceptance"] for m in SWEEP], "s-", color="tab:green", label="acceptance")
        ax2.set_ylabel("acceptance rate")
        ax2.set_ylim(0, 1.05)
        fig.legend(loc="lower left", fontsize=8, bbox_to_anchor=(0.1, 0.12))
        ax.set_title("edgellm speculative on code prompts: speed and acceptance vs draft length")
        fig.tight_layout()
        paths.append(out_dir / "draft-length-sweep.png")
        fig.savefig(paths[1], dpi=120)
    return [str(p) for p in paths]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=CACHE / "bundles/qwen2.5-coder-1.5b-q4km+0.5b-int4")
    p.add_argument("--target-gguf", type=Path, default=CACHE / "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    p.add_argument("--draft-gguf", type=Path, default=CACHE / "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    p.add_argument("--llama-bin", type=Path, default=PEERS / "llama.cpp-build/bin")
    p.add_argument("--genai-target", type=Path, default=PEERS / "models/genai-qwen2.5-coder-1.5b-int4")
    p.add_argument("--genai-draft", type=Path, default=PEERS / "models/genai-qwen2.5-coder-0.5b-int4")
    p.add_argument("--hf-target", type=Path, default=PEERS / "models/hf-qwen2.5-coder-1.5b-instruct")
    p.add_argument("--hf-draft", type=Path, default=PEERS / "models/hf-qwen2.5-coder-0.5b-instruct")
    p.add_argument("--extra-bundle", action="append", default=[], metavar="LABEL=PATH",
                   help="Also run edgellm on another bundle (e.g. int4=~/.cache/edgellm/bundles/...).")
    p.add_argument("--engines", default="edgellm,llama.cpp-bin,llama.cpp,onnxruntime-genai,transformers",
                   help="Engines (peers.py names) to run; llama.cpp = the Python binding, llama.cpp-bin = the binaries.")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-sweep", action="store_true", help="Skip edgellm's fixed draft lengths (speculative@k).")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--replot", type=Path, help="Only redraw the pictures from a results JSON.")
    a = p.parse_args()
    a.engines = a.engines.split(",")
    if a.replot:
        doc = json.loads(a.replot.read_text())
        print(json.dumps(plot(doc, a.out_dir, doc["date"])))
        return

    from edgellm.bundle import read_manifest
    from edgellm.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(a.bundle, read_manifest(a.bundle))
    prompts = load_prompts(tokenizer, a.per_category)
    workers = start_workers(a)
    try:
        runs = run_all(workers, prompts, a)
    finally:
        for w in workers:
            w.close()
    summary = summarize(runs, workers)
    stamp = dt.date.today().isoformat()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"date": stamp, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                      "threads": a.threads, "python": platform.python_version()},
           "settings": {"repeats": a.repeats, "max_new_tokens": a.max_new_tokens, "prompts": [q["id"] for q in prompts],
                        "greedy": True},
           **summary, "plots": plot(summary, a.out_dir, stamp), "runs": runs}
    (a.out_dir / f"{stamp}-peers.json").write_text(json.dumps(doc, indent=1))
    say(render(summary))
    print(json.dumps({k: doc[k] for k in ("date", "machine", "settings", "table", "best", "engines", "plots")}))


if __name__ == "__main__":
    main()
