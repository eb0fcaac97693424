"""Shared test helpers (imported by test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import os

import numpy as np

from tiny import CHAT_TEMPLATE, train_tokenizer


class FakeLM:
    """A deterministic toy LM whose 'KV cache' stores the token ids themselves.

    Logits at a position depend on the last two cached tokens and the position, so a rollback
    bug (a stale or missing cache entry) changes the output and shows up as a list diff.
    """

    def __init__(self, vocab: int = 50, seed: int = 0, max_context: int = 512, temperature: float = 3.0,
                 width: int | None = None):
        rng = np.random.default_rng(seed)
        self.vocab, self.width = vocab, width or vocab
        self.table = rng.normal(size=(vocab, vocab, self.width)) * temperature
        self.pos_bias = rng.normal(size=(max_context, self.width)) * 0.3
        self.max_context = max_context
        self.cache: list[int] = []
        self.calls: list[tuple[int, int]] = []

    @property
    def length(self) -> int:
        return len(self.cache)

    def logits_after(self, prefix: list[int]) -> np.ndarray:
        a = prefix[-2] if len(prefix) > 1 else 0
        return self.table[a, prefix[-1]] + self.pos_bias[len(prefix) - 1]

    def forward(self, token_ids, num_logits: int = 1) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        assert self.length + len(ids) <= self.max_context
        self.calls.append((self.length, len(ids)))
        self.cache.extend(ids)
        out = [self.logits_after(self.cache[: self.length - len(ids) + i + 1]) for i in range(len(ids))]
        return np.stack(out[len(ids) - num_logits:]).astype(np.float32)

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self.length
        del self.cache[length:]

    def cached_ids(self) -> np.ndarray:
        return np.asarray(self.cache, np.int64)


def greedy_reference(model: FakeLM, prompt: list[int], n: int, eos=()) -> list[int]:
    seq = list(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(model.logits_after(seq)[: model.vocab]))
        if tok in eos:
            break
        seq.append(tok)
        out.append(tok)
    return out


def slow_enabled() -> bool:
    return os.environ.get("EDGELLM_SLOW") == "1"


def make_tiny_hf_model(folder, arch: str = "qwen2", seed: int = 0, vocab_size: int = 320, tokenizer=None,
                       model=None):
    """A random 2-layer Hugging Face model (+ a small trained BPE tokenizer) saved in ``folder``.

    ``model``: save this transformers model instead of a random ``arch`` one.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if model is None:
        torch.manual_seed(seed)
        common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2)
        if arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
        else:
            model = LlamaForCausalLM(LlamaConfig(**common))
        with torch.no_grad():  # sharper distributions than the default init: greedy text is less flat
            model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer or train_tokenizer(), eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def run_concurrently(llm, requests, slots: int | None = None) -> list[list[int]]:
    """Each ``(prompt, generate kwargs)`` of ``requests`` on its own thread in one of ``llm``'s
    slots, as the server runs them (their target passes meet at ``llm.gate``); a request waits
    for a free slot, so later ones join while earlier ones are mid-generation. Returns each
    request's token ids, in order."""
    import queue
    import threading

    free = queue.Queue()
    for k in range(slots or len(llm.slots)):
        free.put(k)
    got: dict[int, object] = {}

    def work(i: int, slot: int) -> None:
        prompt, kw = requests[i]
        try:
            with llm.gate.member():
                got[i] = llm.generate(prompt, slot=slot, **kw).token_ids
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            got[i] = e
        finally:
            free.put(slot)

    threads = []
    for i in range(len(requests)):
        t = threading.Thread(target=work, args=(i, free.get()))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=300)
    for i in range(len(requests)):
        if isinstance(got.get(i), BaseException):
            raise got[i]
    return [got[i] for i in range(len(requests))]


#: requests of different prompts, lengths, modes, gammas and sampling settings (tiny bundle), for
#: several sequences in flight: each must get its solo output
MIXED_REQUESTS = [
    ("def foo(x): return", dict(mode="speculative", max_new_tokens=30)),
    ("hello world, héllo wörld", dict(mode="lookup", max_new_tokens=12)),
    ("def foo(x): return x + 1\n" * 3, dict(mode="speculative", num_draft_tokens=2, max_new_tokens=25)),
    ("héllo", dict(mode="target", temperature=0.9, seed=4, max_new_tokens=20)),
    ("def bar(y):", dict(mode="speculative", temperature=0.7, seed=9, num_draft_tokens=3, max_new_tokens=20)),
    ("x = [1, 2, 3]\n" * 6, dict(mode="lookup", temperature=0.8, seed=1, max_new_tokens=16)),
]
