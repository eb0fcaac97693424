"""Load test of ``edgellm serve``: N concurrent clients x M requests, on loopback, bounded in count and time.

    .venv/bin/python benchmarks/load.py [BUNDLE] [--clients 1 2 4] [--requests 3] [--max-tokens 64]
        [--max-batch 4] [--max-seconds 900] [--plot benchmarks/results/load.png]

Starts ``edgellm serve BUNDLE`` on a free loopback port (one server for the whole run), then
for each client count runs that many clients at once, each sending ``--requests`` greedy
streamed requests one after another (a mix of the chat and code prompts in
``benchmarks/prompts``; client c starts at prompt c). Per request: time to first token,
latency, completion tokens; per level: p50/p95 of both, aggregate tok/s (all tokens / wall
time), per-client tok/s, errors, and whether every output equals the one-client run's output
for the same prompt (greedy decoding is exact). Traffic goes to 127.0.0.1 only; the run stops
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

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = Path.home() / ".cache" / "edgellm" / "bundles" / "qwen2.5-coder-1.5b-q4km+0.5b-int4"


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


def run_level(url: str, prompts: list[dict], clients: int, requests: int, max_tokens: int,
              deadline: float) -> tuple[list[list[dict]], float]:
    """``clients`` threads, each sending ``requests`` requests in a row; returns their results and the wall time."""
    results: list[list[dict]] = [[] for _ in range(clients)]

    def client(c: int) -> None:
        for k in range(requests):
            if time.monotonic() > deadline:
                return
            results[c].append(one_request(url, prompts[(c + k * clients) % len(prompts)], max_tokens, deadline))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
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


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [lv["clients"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(n, [lv["aggregate_tokens_per_second"] for lv in levels], "o-", label="all clients")
    a.plot(n, [statistics.median(lv["per_client_tokens_per_second"]) for lv in levels], "s--", label="per client (median)")
    a.set_xlabel("concurrent clients"), a.set_ylabel("tokens / s"), a.legend(), a.set_xticks(n)
    b.plot(n, [lv["ttft_p50_s"] for lv in levels], "o-", label="p50")
    b.plot(n, [lv["ttft_p95_s"] for lv in levels], "s--", label="p95")
    b.set_xlabel("concurrent clients"), b.set_ylabel("time to first token (s)"), b.legend(), b.set_xticks(n)
    fig.suptitle("edgellm serve under load (reference pair, 2 threads, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    a = ap.parse_args()
    if any(c < 1 for c in a.clients) or not 1 <= a.requests <= 50:
        ap.error("--clients must be >= 1 and --requests 1-50 (the load stays bounded)")
    port = free_port()
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(a.bundle), "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(a.threads), "--max-batch", str(a.max_batch), "--max-queue", str(max(a.clients) * 2),
           *a.server_args.split()]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + a.max_seconds
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
        prompts = load_prompts()
        one_request(url, prompts[0], 8, deadline)  # warm-up
        reference: dict[str, str] = {}
        levels = []
        for clients in a.clients:
            results, wall = run_level(url, prompts, clients, a.requests, a.max_tokens, deadline)
            if clients == 1:
                reference.update({r["prompt"]: r["text"] for rs in results for r in rs if "error" not in r})
            lv = {"clients": clients, **summarize(results, wall, reference)}
            levels.append(lv)
            print(f"{clients} client(s): {lv['requests']} requests, {lv['errors']} errors; aggregate "
                  f"{lv['aggregate_tokens_per_second']:.1f} tok/s, per client "
                  f"{statistics.median(lv['per_client_tokens_per_second'] or [0]):.1f}; first token p50 "
                  f"{lv['ttft_p50_s'] or 0:.2f} s p95 {lv['ttft_p95_s'] or 0:.2f} s; latency p50 "
                  f"{lv['latency_p50_s'] or 0:.1f} s; identical: {lv['identical_to_one_client']}", file=sys.stderr)
        health = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(30)
    if a.plot and levels:
        plot(levels, a.plot)
    print(json.dumps({"bundle": a.bundle.name, "threads": a.threads, "max_batch": a.max_batch,
                      "max_tokens": a.max_tokens, "requests_per_client": a.requests, "levels": levels,
                      "server": {k: health.get(k) for k in ("served", "prompt_cache", "shared_lookup")}}))


if __name__ == "__main__":
    main()
