"""Load test of ``edgellm serve``: N concurrent clients x M requests, on loopback, bounded in count and time.

    .venv/bin/python benchmarks/load.py [BUNDLE] [--clients 1 2 4] [--requests 3] [--max-tokens 64]
        [--max-batch 4] [--max-seconds 900] [--plot docs/load.png]
    .venv/bin/python benchmarks/load.py --plot-from RUN1.json RUN2.json --plot docs/load.png

For each client count, starts a fresh ``edgellm serve BUNDLE`` on a free loopback port (so no
level gains from the prompt cache or shared lookup of an earlier one) and runs that many
clients at once, each sending ``--requests`` greedy
streamed requests one after another (a mix of the chat and code prompts in
``benchmarks/prompts``; client c starts at prompt c). Per request: time to first token,
latency, completion tokens; per level: p50/p95 of both, aggregate tok/s (all tokens / wall
time), per-client tok/s, errors, and whether every output equals the one-client run's output
for the same prompt (greedy decoding is exact; the one-client level sends every prompt any
level sends, one after another). Traffic goes to 127.0.0.1 only; the run stops
sending when ``--max-seconds`` is spent. Human table on stderr, JSON as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from edgellm.demo import BUNDLE_NAME
from edgellm.fetch import default_cache_dir

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = default_cache_dir() / "bundles" / BUNDLE_NAME  # what scripts/main.sh exports


def load_prompts() -> list[dict]:
    """Chat and code prompts, alternating (chat requests as messages, code as text completions)."""
    rows = {c: [json.loads(line) for line in (HERE / "prompts" / f"{c}.jsonl").read_text().splitlines() if line]
            for c in ("chat", "code")}
    mixed = []
    for i in range(max(len(v) for v in rows.values())):
        mixed += [r[i] for r in (rows["code"], rows["chat"]) if i < len(r)]
    return mixed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, prompt: dict, max_tokens: int, deadline: float) -> dict:
    """Send one streamed greedy request; time its first token and its end."""
    chat = "messages" in prompt
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **({"messages": prompt["messages"]} if chat else {"prompt": prompt["prompt"]})}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0, first, text, tokens = time.perf_counter(), None, "", 0
    try:
        with httpx.stream("POST", url + path, json=body, timeout=max(1.0, deadline - time.monotonic())) as r:
            if r.status_code != 200:
                return {"prompt": prompt["id"], "error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if "error" in doc:
                    return {"prompt": prompt["id"], "error": doc["error"]["message"]}
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
                for ch in doc.get("choices", []):
                    piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    if piece:
                        first = first or time.perf_counter()
                        text += piece
    except httpx.HTTPError as e:
        return {"prompt": prompt["id"], "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    return {"prompt": prompt["id"], "ttft_s": (first or end) - t0, "latency_s": end - t0, "tokens": tokens,
            "tokens_per_second": tokens / (end - t0), "text": text}


def schedule(prompts: list[dict], clients: int, requests: int) -> list[list[dict]]:
    """What each of ``clients`` clients sends, in order: client c starts at prompt c."""
    return [[prompts[(c + k * clients) % len(prompts)] for k in range(requests)] for c in range(clients)]


def run_level(url: str, plan: list[list[dict]], max_tokens: int, deadline: float) -> tuple[list[list[dict]], float]:
    """One thread per client, each sending its requests in a row; returns their results and the wall time."""
    results: list[list[dict]] = [[] for _ in plan]

    def client(c: int) -> None:
        for prompt in plan[c]:
            if time.monotonic() > deadline:
                return
            results[c].append(one_request(url, prompt, max_tokens, deadline))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summarize(results: list[list[dict]], wall: float, reference: dict[str, str]) -> dict:
    done = [r for rs in results for r in rs if "error" not in r]
    errors = [r for rs in results for r in rs if "error" in r]
    per_client = [sum(r["tokens"] for r in rs if "error" not in r) / max(1e-9, sum(r["latency_s"] for r in rs
                  if "error" not in r)) for rs in results if any("error" not in r for r in rs)]
    same = [r["text"] == reference[r["prompt"]] for r in done if r["prompt"] in reference]
    return {
        "requests": len(done), "errors": len(errors), "error_messages": [e["error"] for e in errors][:5],
        "wall_s": wall, "aggregate_tokens_per_second": sum(r["tokens"] for r in done) / wall,
        "per_client_tokens_per_second": per_client,
        "ttft_p50_s": pct([r["ttft_s"] for r in done], 50), "ttft_p95_s": pct([r["ttft_s"] for r in done], 95),
        "latency_p50_s": pct([r["latency_s"] for r in done], 50),
        "latency_p95_s": pct([r["latency_s"] for r in done], 95),
        "identical_to_one_client": all(same) if same else None, "compared": len(same),
    }


def plot(runs: list[dict], path: Path) -> None:
    """Aggregate and per-client tok/s and time to first token against clients, one line per run (its
    max_batch, and whether the server batched its passes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for run, color in zip(runs, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        lv, tag = run["levels"], f"max-batch {run['max_batch']}"
        batched = lv[-1].get("server", {}).get("batched")
        if run["max_batch"] > 1 and batched is not None:  # runs from before batch graphs do not say
            tag += ", batched passes" if batched else ", passes in turn"
        n = [x["clients"] for x in lv]
        a.plot(n, [x["aggregate_tokens_per_second"] for x in lv], "o-", color=color, label=f"{tag}: all clients")
        a.plot(n, [statistics.median(x["per_client_tokens_per_second"]) for x in lv], "s:", color=color,
               label=f"{tag}: per client")
        b.plot(n, [x["ttft_p50_s"] for x in lv], "o-", color=color, label=f"{tag}: p50")
        b.plot(n, [x["ttft_p95_s"] for x in lv], "s:", color=color, label=f"{tag}: p95")
        a.set_xticks(n), b.set_xticks(n)
    a.set_xlabel("concurrent clients"), a.set_ylabel("tokens / s"), a.legend(fontsize=7)
    b.set_xlabel("concurrent clients"), b.set_ylabel("time to first token (s)"), b.legend(fontsize=7)
    fig.suptitle(f"edgellm serve under load ({runs[0]['bundle']}, {runs[0]['threads']} threads, loopback)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class Server:
    """``edgellm serve`` in a subprocess on a free loopback port, for one level of the run."""

    def __init__(self, a: argparse.Namespace, clients: int, deadline: float) -> None:
        self.port, self.deadline = free_port(), deadline
        self.cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(a.bundle), "--host", "127.0.0.1",
                    "--port", str(self.port), "--threads", str(a.threads), "--max-batch", str(a.max_batch),
                    "--max-queue", str(clients * 2), *a.server_args.split()]

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{self.port}"
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > self.deadline:
                self.proc.kill()
                sys.exit(f"the server did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.5)

        def health() -> dict:
            h = httpx.get(url + "/health").json()
            return {k: h.get(k) for k in ("served", "max_batch", "batched", "prompt_cache", "shared_lookup")}

        return url, health

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--requests", type=int, default=3, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--server-args", default="", help="more edgellm serve options, space-separated")
    ap.add_argument("--plot-from", nargs="+", type=Path, default=None,
                    help="only draw --plot from earlier runs' JSON files (their last lines), one line each")
    a = ap.parse_args()
    if a.plot_from:
        plot([json.loads(f.read_text().strip().splitlines()[-1]) for f in a.plot_from], a.plot)
        return
    if any(c < 1 for c in a.clients) or not 1 <= a.requests <= 50:
        ap.error("--clients must be >= 1 and --requests 1-50 (the load stays bounded)")
    prompts = load_prompts()
    deadline = time.monotonic() + a.max_seconds
    reference: dict[str, str] = {}
    levels = []
    for clients in a.clients:
        with Server(a, clients, deadline) as (url, health):
            one_request(url, prompts[-1], 8, deadline)  # warm-up (a prompt the clients send last, if at all)
            plan = schedule(prompts, clients, a.requests)
            if clients == 1 and not reference:  # the solo run: every prompt any level sends, for the comparison
                plan = [[q for q in prompts if any(q is r for n in a.clients for c in schedule(prompts, n, a.requests)
                                                   for r in c)]]
            results, wall = run_level(url, plan, a.max_tokens, deadline)
            if not reference:
                reference.update({r["prompt"]: r["text"] for rs in results for r in rs if "error" not in r})
            lv = {"clients": clients, **summarize(results, wall, reference), "server": health()}
        levels.append(lv)
        print(f"{clients} client(s): {lv['requests']} requests, {lv['errors']} errors; aggregate "
              f"{lv['aggregate_tokens_per_second']:.1f} tok/s, per client "
              f"{statistics.median(lv['per_client_tokens_per_second'] or [0]):.1f}; first token p50 "
              f"{lv['ttft_p50_s'] or 0:.2f} s p95 {lv['ttft_p95_s'] or 0:.2f} s; latency p50 "
              f"{lv['latency_p50_s'] or 0:.1f} s; identical: {lv['identical_to_one_client']}", file=sys.stderr)
    doc = {"bundle": a.bundle.name, "threads": a.threads, "max_batch": a.max_batch, "max_tokens": a.max_tokens,
           "requests_per_client": a.requests, "server_args": a.server_args, "levels": levels}
    if a.plot and levels:
        try:
            plot([doc], a.plot)
        except ImportError:
            print("no plot: matplotlib is missing (pip install 'edgellm[bench]')", file=sys.stderr)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
