"""Routed experts against every expert computed: the step time of a mixture of experts, both ways.

    .venv/bin/python benchmarks/moe_experts.py [--model granitemoe-1b-a400m] [--layers 4]
                                               [--rows 1 2 5] [--repeats 15] [--past 160]

No real MoE checkpoint is reachable here, so the model is a random one with a real model's shapes
(``--model``: the config fields of that checkpoint, ``--layers`` of its blocks), saved with
transformers and exported twice as int4 (block 32): once as edgellm exports it (the experts
routed through onnxruntime's ``QMoE``: a row reads only its ``top_k`` experts) and once with
every expert computed for every row (how it was exported before). Both targets are loaded at
once; each repeat runs one pass of ``k`` new tokens over ``--past`` cached positions on each in
turn, with the target's row rules (``min_rows`` 2), so a 1-row pass is a target-mode step.
Medians. The two graphs round the experts' int8 activations apart (the routing weight is
applied before the down projection in one, after it in the other), so their logits are compared
(largest difference over the prompt's last 8 positions, against the logits' spread) and their
greedy tokens reported: a random model's logits are flat, so near-ties, and a different token
after a few steps, are expected. Human table
on stderr, JSON as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: the shapes of real mixtures of experts (their config.json fields), by name
MODELS = {
    "granitemoe-1b-a400m": ("GraniteMoeConfig", dict(
        hidden_size=1024, intermediate_size=512, num_local_experts=32, num_experts_per_tok=8, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=8, vocab_size=49155)),
    "olmoe-1b-7b": ("OlmoeConfig", dict(
        hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
        vocab_size=151936)),
}


def random_model(folder: Path, name: str, layers: int) -> Path:
    """Save a random ``name``-shaped model with ``layers`` blocks and a small BPE tokenizer in ``folder``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    cls_name, fields = MODELS[name]
    config = getattr(transformers, cls_name)(**(fields | dict(num_hidden_layers=layers)))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    text = (Path(__file__).resolve().parent.parent / "edgellm" / "data" / "quality_sample.txt").read_text()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_end|>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>").save_pretrained(folder)
    return folder


def export_both(folder: Path, out: Path) -> dict[str, Path]:
    """The routed export and the every-expert one (the builder told no expert may be routed)."""
    from edgellm.export import builder, export

    bundles = {"routed": export(folder, output=out / "routed", quant="int4", block_size=32, max_context=256,
                                quality="none")}
    routed = builder.routed_experts_reason
    builder.routed_experts_reason = lambda *a: "the comparison's every-expert graph"
    try:
        bundles["every_expert"] = export(folder, output=out / "every_expert", quant="int4", block_size=32,
                                         max_context=256, quality="none")
    finally:
        builder.routed_experts_reason = routed
    return bundles


def main() -> None:
    from step_time import median_pass_ms

    from edgellm.api import _layout
    from edgellm.bundle import read_manifest
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.session import DecoderSession

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="granitemoe-1b-a400m")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 5])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--past", type=int, default=160)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bundles = export_both(random_model(Path(tmp) / "model", a.model, a.layers), Path(tmp))
        print(f"model and both exports: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        sessions = {}
        for name, b in bundles.items():
            m = read_manifest(b)
            sessions[name] = DecoderSession(b / m.target.graph, _layout(m.target), resolve_provider("cpu"), a.threads,
                                            min_rows=2)
        graphs = {name: b / read_manifest(b).target.graph for name, b in bundles.items()}
        sizes = {name: g.stat().st_size + Path(f"{g}.data").stat().st_size for name, g in graphs.items()}
        ids = np.random.default_rng(0).integers(3, 400, a.past + max(a.rows))
        greedy, first = {}, {}
        for name, s in sessions.items():
            logits = first[name] = s.forward(ids[: a.past], 8)
            seq = [int(logits[-1].argmax())]
            for _ in range(15):
                seq.append(int(s.forward(np.array(seq[-1:]), 1)[-1].argmax()))
            greedy[name] = seq
        ms = median_pass_ms(sessions, ids, a.past, a.rows, a.repeats)
    result = {"model": a.model, "layers": f"{a.layers} of {MODELS[a.model][1]['num_hidden_layers']}",
              "threads": a.threads, "past": a.past, "repeats": a.repeats,
              "target_bytes": sizes,
              "ms_per_pass": {n: {str(r): round(v, 2) for r, v in d.items()} for n, d in ms.items()},
              "speedup": {str(r): round(ms["every_expert"][r] / ms["routed"][r], 2) for r in a.rows},
              "greedy_tokens_equal": greedy["routed"] == greedy["every_expert"],
              "prompt_logits_max_difference": float(np.abs(first["routed"] - first["every_expert"]).max()),
              "prompt_logits_std": float(first["every_expert"].std())}
    print(f"{a.model}, {result['layers']} layers, int4 block 32, {a.threads} threads, past {a.past}:", file=sys.stderr)
    for r in a.rows:
        print(f"  {r}-row pass: routed {ms['routed'][r]:.1f} ms, every expert {ms['every_expert'][r]:.1f} ms "
              f"({result['speedup'][str(r)]}x)", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
