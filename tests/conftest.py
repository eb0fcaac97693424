"""Shared test helpers: a pure-numpy fake language model with a KV cache of token ids."""

from __future__ import annotations

import os

import numpy as np
import pytest


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


@pytest.fixture
def fake_lm():
    return FakeLM


def slow_enabled() -> bool:
    return os.environ.get("EDGELLM_SLOW") == "1"


# --------------------------------------------------------------------------- tiny real models
def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def foo(x): return x + 1\n" * 50, "hello world, héllo wörld 😀 " * 30], trainer)
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


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
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer or _train_tokenizer(), eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_dir):
    """A bundle whose draft is the target itself (int4 target, int4 draft): must accept everything."""
    from edgellm.export import export

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export(tiny_model_dir, draft=tiny_model_dir, output=out, max_context=256, draft_quant="int4",
                  draft_block_size=32, lm_head_quant="int4")
