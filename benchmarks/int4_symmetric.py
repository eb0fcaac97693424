"""Symmetric against asymmetric int4 blocks for the target: step time and what they cost in quality.

    .venv/bin/python benchmarks/int4_symmetric.py [--bundle DEFAULT_BUNDLE] [--repeats 25]

Builds the reference target (the cached GGUF) twice as int4 in blocks of 32 with an int8 LM head,
once with zero points (asymmetric, the exporter's default) and once without (symmetric: fewer
bytes, no zero-point work in the kernel), into a temporary folder. Each graph's logits over 256
tokens of the quality sample are compared with the default bundle's target (its GGUF blocks kept
exactly): top-1 agreement and mean KL. Then one pass of 1 and of 2 new tokens over 160 cached
positions on each of the three in turn, ``--repeats`` times (2 threads; medians). Human lines on
stderr, JSON as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm"))


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(got)), nats; both ``(n, V)``."""
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def main() -> None:
    from step_time import median_pass_ms

    import edgellm
    from edgellm.api import _layout
    from edgellm.bundle import read_manifest
    from edgellm.export.builder import DecoderBuilder, QuantConfig
    from edgellm.export.source import open_source
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.session import DecoderSession

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=CACHE / "bundles" / "qwen2.5-coder-1.5b-q4km+0.5b-int4")
    ap.add_argument("--gguf", type=Path, default=CACHE / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    a = ap.parse_args()
    m = read_manifest(a.bundle)
    layout = _layout(m.target)
    ids = np.array(edgellm.load(a.bundle).tokenizer.encode(
        (ROOT / "edgellm" / "data" / "quality_sample.txt").read_text(), add_special_tokens=False)[:256], np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        src = open_source(a.gguf)
        graphs = {"default bundle": a.bundle / m.target.graph}
        for name, symmetric in (("int4 asymmetric", False), ("int4 symmetric", True)):
            out = Path(tmp) / name.replace(" ", "_")
            out.mkdir()
            q = QuantConfig("int4", block_size=32, symmetric=symmetric, lm_head_quant="int8")
            graphs[name] = DecoderBuilder(src, q, layout.max_context).build(out)
        sessions = {n: DecoderSession(g, layout, resolve_provider("cpu"), a.threads) for n, g in graphs.items()}
        logits = {n: s.forward(ids, len(ids)) for n, s in sessions.items()}
        ref = logits["default bundle"]
        quality = {n: {"top1_agreement": float((lg.argmax(-1) == ref.argmax(-1)).mean()), "mean_kl": mean_kl(ref, lg)}
                   for n, lg in logits.items() if n != "default bundle"}
        past = 160
        ms = {n: {str(r): round(v, 1) for r, v in d.items()}
              for n, d in median_pass_ms(sessions, ids, past, [1, 2], a.repeats).items()}
    for n in sessions:
        q = quality.get(n)
        print(f"{n:18s} 1-row {ms[n]['1']} ms, 2-row {ms[n]['2']} ms"
              + (f", vs the GGUF blocks: top-1 {q['top1_agreement']:.3f}, KL {q['mean_kl']:.4f}" if q else ""),
              file=sys.stderr)
    print(json.dumps({"threads": a.threads, "past": past, "repeats": a.repeats, "tokens": len(ids),
                      "ms_per_pass": ms, "quality_vs_gguf_blocks": quality}))


if __name__ == "__main__":
    main()
