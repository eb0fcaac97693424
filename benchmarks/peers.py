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
        cfg = llm.decode_config(mode=name, max_new_tokens=max_new, num_draft_tokens=int(k) if k else None,
                                cache_prompt=False)  # a cold prompt each time, as the peers' runs
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


# ----------------------------------------------------------------------------- llama.cpp binaries
LLAMA_BIN_MODES = {  # mode -> (binary, extra arguments); the binaries built by setup_peers.sh
    "target": ("llama-completion", ["-no-cnv", "--no-warmup"]),  # prompt echoed, as by the others
    **{f"speculative@{k}": ("llama-speculative-simple", ["--spec-type", "draft-simple", "--spec-draft-n-max", str(k)])
       for k in (4, 8, 16)},
    "ngram": ("llama-speculative-simple", ["--spec-type", "ngram-simple"]),
    "lookup": ("llama-lookup", ["--spec-draft-n-max", "8"]),
}


def _llama_stats(text: str) -> dict[str, float]:
    """Timings the binaries print: llama_perf lines (completion) or 'encoded/decoded ... speed' (speculation)."""
    import re

    out: dict[str, float] = {}
    m = re.search(r"prompt eval time =\s*([\d.]+) ms", text)
    if m:
        out["ttft_s"] = float(m.group(1)) / 1e3
    m = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second", text)
    if m:
        out["decode_tps"] = float(m.group(3))
    m = re.search(r"encoded\s+\d+ tokens in\s+([\d.]+) seconds", text)
    if m:
        out["ttft_s"] = float(m.group(1))
    m = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", text)
    if m:
        out["decode_tps"] = float(m.group(1))
    m = re.search(r"accept\s+=\s+([\d.]+)%", text)
    if m:
        out["acceptance"] = float(m.group(1)) / 100
    return out


def llamacpp_bin_engine(a: argparse.Namespace) -> tuple[dict[str, Any], Callable]:
    """llama.cpp's own binaries (built from the source vendored in the llama-cpp-python sdist).

    Each generation is one process given the prompt as text (``-p``: the prompt token ids rendered
    back to text, special tokens included; llama.cpp tokenizes it to the same ids). Speeds are the binaries' own
    decode timings; the output text is re-tokenized with the bundle's tokenizer for the
    equal-to-own-target check.
    """
    import subprocess
    from pathlib import Path

    from edgellm.bundle import read_manifest
    from edgellm.tokenizer import TextTokenizer

    bins = Path(a.llama_bin)
    tok = TextTokenizer(Path(a.bundle), read_manifest(Path(a.bundle)))
    missing = sorted({b for b, _ in LLAMA_BIN_MODES.values() if not (bins / b).is_file()})
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not in {bins} (run benchmarks/setup_peers.sh)")
    common = ["-m", a.target_gguf, "-t", str(a.threads), "-tb", str(a.threads), "-c", "4096", "--temp", "0", "-s", "1"]

    def run(ids: list[int], mode: str, max_new: int) -> dict[str, Any]:
        binary, extra = LLAMA_BIN_MODES[mode]
        prompt = tok.tok.decode(ids, skip_special_tokens=False)
        draft = ["-md", a.draft_gguf, "-td", str(a.threads), "-tbd", str(a.threads)] if "draft-simple" in extra else []
        n = max_new - 1 if binary == "llama-speculative-simple" else max_new  # it runs one token past -n
        # -p, not -f: llama.cpp drops a prompt file's trailing newline, which changes the prompt's ids
        cmd = [str(bins / binary), *common, "-p", prompt, "-n", str(n), *draft, *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{binary} exited {p.returncode}: {p.stderr[-800:]}")
        # the echo of the prompt: llama-completion drops special tokens, the speculative binaries keep them
        shown = next((c for c in (prompt, tok.tok.decode(ids, skip_special_tokens=True)) if c in p.stdout), None)
        text = p.stdout.split(shown, 1)[1] if shown else p.stdout
        text = text.replace("[end of text]", "").rstrip("\n")
        tokens = [t for t in tok.encode(text, add_special_tokens=False) if t not in EOS][:max_new]
        st = _llama_stats(p.stdout + p.stderr)
        return {"tokens": tokens, "ttft_s": st.get("ttft_s", 0.0), "decode_tps": st.get("decode_tps"),
                "total_s": None, "acceptance": st.get("acceptance")}

    version = subprocess.run([str(bins / "llama-completion"), "--version"], capture_output=True, text=True)
    info = {"engine": "llama.cpp-bin", "modes": list(LLAMA_BIN_MODES), "retokenized": True,
            "version": "llama.cpp binaries " + ((version.stdout + version.stderr).strip().splitlines() or ["?"])[0]}
    return info, run


# ----------------------------------------------------------------------------- onnxruntime-genai
def _genai_folder(target: str, draft: str | None, threads: int, out: str) -> str:
    """A model folder for onnxruntime-genai: the target's config with the thread count set and, with
    ``draft``, a ``model.draft`` block (the draft's decoder) for its draft-model speculation."""
    import shutil

    cfg = json.load(open(os.path.join(target, "genai_config.json")))
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(target):  # graphs and tokenizer files, linked (no copy of the weights)
        if name != "genai_config.json" and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.join(target, name), os.path.join(out, name))
    if draft is not None:
        dcfg = json.load(open(os.path.join(draft, "genai_config.json")))["model"]["decoder"]
        dcfg.setdefault("session_options", {})["intra_op_num_threads"] = threads
        if not os.path.exists(os.path.join(out, "draft")):
            shutil.copytree(draft, os.path.join(out, "draft"), symlinks=True,
                            copy_function=lambda s, d: os.symlink(os.path.abspath(s), d))
        dcfg["filename"] = os.path.join("draft", dcfg["filename"])
        cfg["model"]["draft"] = dcfg  # the draft's decoder block itself (0.18 knows no "decoder" key here)
        cfg["speculative"] = {"max_draft_tokens": 4}
    json.dump(cfg, open(os.path.join(out, "genai_config.json"), "w"), indent=2)
    return out


GENAI_MODES = {  # mode -> speculative options (None: plain decoding); n-gram cannot use the draft model
    "target": None,
    "speculative@4": {"max_draft_tokens": 4}, "speculative@8": {"max_draft_tokens": 8},
    "speculative": {"max_draft_tokens": 8, "min_adaptive_k": 2},  # adaptive draft length
    "ngram": {"ngram_size": 3, "max_draft_tokens": 8},
}


def genai_engine(a: argparse.Namespace) -> tuple[dict[str, Any], Callable]:
    import tempfile

    import onnxruntime_genai as og

    work = tempfile.mkdtemp(prefix="genai-")
    plain = og.Model(og.Config(_genai_folder(a.genai_target, None, a.threads, os.path.join(work, "plain"))))
    spec = None
    if a.genai_draft:
        spec = og.Model(og.Config(_genai_folder(a.genai_target, a.genai_draft, a.threads, os.path.join(work, "spec"))))

    def run(ids: list[int], mode: str, max_new: int) -> dict[str, Any]:
        opts = GENAI_MODES[mode]
        model = spec if opts and "ngram_size" not in opts else plain
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new, batch_size=1)
        if opts:
            params.set_speculative_options(**opts)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()

        def stream() -> Iterator[list[int]]:
            gen.append_tokens(ids)
            seen = len(ids)
            while not gen.is_done():
                gen.generate_next_token()
                seq = list(gen.get_sequence(0))
                new, seen = seq[seen:], len(seq)  # a speculative step may commit several tokens
                yield [int(t) for t in new]

        out = timed(stamp(stream()), t0, max_new)
        if opts:
            st = dict(gen.get_speculative_stats())
            proposed = st.get("draft_tokens_proposed") or 0
            out["acceptance"] = st.get("draft_tokens_accepted", 0) / proposed if proposed else None
        return out

    modes = [m for m in GENAI_MODES if spec is not None or not (GENAI_MODES[m] and "ngram_size" not in GENAI_MODES[m])]
    skipped = {} if spec is not None else {"speculative": "no draft model (--genai-draft) given"}
    return {"engine": "onnxruntime-genai", "version": og.__version__, "modes": modes, "skipped_modes": skipped}, run


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


ENGINES = {"edgellm": edgellm_engine, "llama.cpp": llamacpp_engine, "llama.cpp-bin": llamacpp_bin_engine,
           "onnxruntime-genai": genai_engine, "transformers": transformers_engine}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=sorted(ENGINES))
    for opt in ("bundle", "target-gguf", "draft-gguf", "llama-bin", "genai-target", "genai-draft", "hf-target",
                "hf-draft"):
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
