"""One engine in its own process: ``python peers.py ENGINE --arg value ...``.

Each engine (edgellm, llama.cpp through llama-cpp-python, onnxruntime-genai, Hugging Face
transformers) may need its own virtual environment, so ``compare.py`` starts this file once
per engine with that environment's Python and talks JSON lines over stdin/stdout:

    worker -> {"ready": true, "engine": ..., "version": ..., "modes": [...], "skipped_modes": {...}}
           or {"skipped": "why"}
    compare -> {"ids": [prompt token ids], "mode": "...", "max_new_tokens": N}
    worker -> {"tokens": [...], "ttft_s": ..., "decode_tps": ..., "total_s": ..., "acceptance": ...}
    compare -> {"quit": true}          worker -> {"peak_rss_mb": ...}

Every engine is greedy, gets the same prompt token ids and the same thread count, and stops at
eos or after ``max_new_tokens``. Decode speed = (tokens - 1) / (time of the last token - time of
the first), the same definition for all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Callable, Iterator

EOS = {151643, 151645}  # Qwen2.5: <|endoftext|>, <|im_end|>


def stamp(stream: Iterator[list[int]]) -> Iterator[tuple[float, list[int]]]:
    """Pair each piece of a live token stream with the time it arrived."""
    for piece in stream:
        yield time.perf_counter(), piece


def timed(stream: Iterator[tuple[float, list[int]]], t0: float, max_new: int) -> dict[str, Any]:
    """Collect (arrival time, tokens) pieces with the timing rules common to all engines."""
    tokens: list[int] = []
    t_first = t_last = None
    for now, piece in stream:
        for tok in piece:
            if tok in EOS or len(tokens) >= max_new:
                break
            tokens.append(int(tok))
        t_first, t_last = t_first or now, now
        if len(tokens) >= max_new or any(t in EOS for t in piece):
            break
    n = len(tokens)
    span = (t_last or t0) - (t_first or t0)
    return {"tokens": tokens, "ttft_s": (t_first or t0) - t0, "total_s": (t_last or t0) - t0,
            "decode_tps": (n - 1) / span if n > 1 and span > 0 else None}


# ----------------------------------------------------------------------------- edgellm
def edgellm_engine(a: argparse.Namespace) -> tuple[dict[str, Any], Callable]:
    import edgellm
    from edgellm.speculative import DecodeStats

    llm = edgellm.load(a.bundle, threads=a.threads)

    def run(ids: list[int], mode: str, max_new: int) -> dict[str, Any]:
        name, _, k = mode.partition("@")  # "speculative@3": a fixed number of draft tokens
        cfg = llm.decode_config(mode=name, max_new_tokens=max_new, num_draft_tokens=int(k) if k else None)
        stats = DecodeStats()
        t0 = time.perf_counter()
        out = timed(stamp(r.tokens for r in llm.generate_tokens(ids, cfg, stats)), t0, max_new)
        return {**out, "acceptance": stats.acceptance_rate,
                "tokens_per_round": (len(out["tokens"]) - 1) / stats.rounds if stats.rounds else None}

    modes = ["target", "speculative", "lookup"] + ([] if a.no_sweep else [f"speculative@{k}" for k in (1, 2, 3, 4, 6, 8)])
    quant = llm.manifest.target.quantization["quant"]
    return {"engine": "edgellm", "version": f"edgellm {edgellm.__version__} (target {quant})", "modes": modes}, run


# ----------------------------------------------------------------------------- llama.cpp
def llamacpp_engine(a: argparse.Namespace) -> tuple[dict[str, Any], Callable]:
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    common = dict(n_ctx=4096, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512, verbose=False)
    # Drafting needs logits for every position, which slows plain decoding: one instance each
    # (the weights are memory-mapped once).
    plain = llama_cpp.Llama(a.target_gguf, **common)
    lookup = llama_cpp.Llama(a.target_gguf, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10), **common)

    def run(ids: list[int], mode: str, max_new: int) -> dict[str, Any]:
        llm = lookup if mode == "lookup" else plain
        llm.reset()
        t0 = time.perf_counter()
        gen = llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        return timed(stamp([t] for t in gen), t0, max_new)

    info = {"engine": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}",
            "modes": ["target", "lookup"],
            "skipped_modes": {"speculative": "llama-cpp-python's API has prompt-lookup drafting only; draft-model "
                                             "speculation is in llama.cpp's own binaries, not its Python binding"}}
    return info, run


# ----------------------------------------------------------------------------- onnxruntime-genai
def genai_engine(a: argparse.Namespace) -> tuple[dict[str, Any], Callable]:
    import onnxruntime_genai as og

    cfg_path = os.path.join(a.genai_target, "genai_config.json")  # the thread count lives in the config
    cfg = json.load(open(cfg_path))
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != a.threads:
        opts["intra_op_num_threads"] = a.threads
        json.dump(cfg, open(cfg_path, "w"), indent=2)
    config = og.Config(a.genai_target)
    model = og.Model(config)

    def run(ids: list[int], mode: str, max_new: int) -> dict[str, Any]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()

        def stream() -> Iterator[list[int]]:
            gen.append_tokens(ids)
            while not gen.is_done():
                gen.generate_next_token()
                yield [int(gen.get_next_tokens()[0])]

        return timed(stamp(stream()), t0, max_new)

    skipped = {"speculative": f"onnxruntime-genai {og.__version__} on PyPI has no speculative decoding "
                              "(draft-model and n-gram speculation are on its main branch only)"}
    return {"engine": "onnxruntime-genai", "version": og.__version__, "modes": ["target"],
            "skipped_modes": skipped}, run


# ----------------------------------------------------------------------------- transformers
def transformers_engine(a: argparse.Namespace) -> tuple[dict[str, Any], Callable]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    target = AutoModelForCausalLM.from_pretrained(a.hf_target, torch_dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(a.hf_draft, torch_dtype=torch.float32).eval() if a.hf_draft else None

    class Streamer:
        def __init__(self) -> None:
            self.pieces: list[tuple[float, list[int]]] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # the first call hands over the prompt
                self.prompt_seen = True
                return
            self.pieces.append((time.perf_counter(), value.reshape(-1).tolist()))

        def end(self) -> None:
            pass

    def run(ids: list[int], mode: str, max_new: int) -> dict[str, Any]:
        extra = {"assisted": {"assistant_model": draft}, "lookup": {"prompt_lookup_num_tokens": 10}}.get(mode, {})
        s = Streamer()
        t0 = time.perf_counter()
        with torch.inference_mode():
            target.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, streamer=s,
                            eos_token_id=sorted(EOS), pad_token_id=151643, **extra)
        return timed(iter(s.pieces), t0, max_new)

    modes = ["target"] + (["assisted"] if draft is not None else [])  # its prompt lookup: ~as slow as target here
    return {"engine": "transformers", "version": f"transformers {transformers.__version__}, torch {torch.__version__} "
                                                  "(fp32, the dequantized GGUF)", "modes": modes}, run


ENGINES = {"edgellm": edgellm_engine, "llama.cpp": llamacpp_engine, "onnxruntime-genai": genai_engine,
           "transformers": transformers_engine}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=sorted(ENGINES))
    for opt in ("bundle", "target-gguf", "genai-target", "hf-target", "hf-draft"):
        p.add_argument(f"--{opt}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sweep", action="store_true", help="edgellm: skip the fixed-draft-length modes")
    a = p.parse_args()
    try:
        info, run = ENGINES[a.engine](a)
    except Exception as e:  # an engine that cannot load is reported as skipped, with the reason
        print(json.dumps({"skipped": f"{type(e).__name__}: {e}"}), flush=True)
        return
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        print(json.dumps(run(req["ids"], req["mode"], req["max_new_tokens"])), flush=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
