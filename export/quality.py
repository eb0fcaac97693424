"""Quality report: what export and quantization cost, measured on sample text.

For each model: the fp32 ONNX graph against the source model (``max_abs_diff`` of logits,
``full`` level only, needs torch), and the quantized graph against the fp32 graph
(teacher-forced greedy top-1 agreement, mean KL divergence, max abs diff of logits).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import numpy as np

from edgellm.runtimes.providers import resolve_provider
from edgellm.runtimes.session import DecoderSession, KVLayout

logger = logging.getLogger(__name__)



def sample_text() -> str:
    """The text shipped with edgellm for quality checks (code and prose)."""
    return resources.files("edgellm").joinpath("data/quality_sample.txt").read_text(encoding="utf-8")


def graph_logits(graph: Path, layout: KVLayout, ids: np.ndarray, threads: int | None = None,
                 logits_tokens: np.ndarray | None = None, adapter: tuple[str, dict] | None = None) -> np.ndarray:
    """Teacher-forced logits of every position of ``ids`` (int64 ``(n,)``) -> float32 ``(n, V)``.

    ``logits_tokens``: the graph's logits columns when its head keeps only those tokens (``-inf`` elsewhere).
    ``adapter``: ``(name, branch matrices)`` of a LoRA adapter to compute with (the graph has its branches).
    """
    sess = DecoderSession(graph, layout, resolve_provider("cpu"), threads=threads, logits_tokens=logits_tokens)
    if adapter is not None:
        sess.set_adapter(*adapter)
    return sess.forward(ids, num_logits=len(ids))


def static_graph_logits(graph: Path, entry: dict, ids: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Teacher-forced logits ``(n, V)`` of a static (npu) graph, run window by window on the CPU."""
    from edgellm.runtimes.static_session import StaticDecoderSession

    sess = StaticDecoderSession.from_entry(graph, entry, resolve_provider("cpu"), threads)
    return sess.forward(ids, num_logits=len(ids))


def source_logits(src, ids: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    """Logits of the source model run by transformers (torch), float32 ``(n, V)``; with ``adapter``
    (a PEFT LoRA folder) merged into its weights by PEFT. Eager attention: the reference math
    (transformers' SDPA path drops Gemma 2's attention soft-capping without a word)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.export.gguf_source import GGUFSource

    if isinstance(src, GGUFSource):
        model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                     torch_dtype=torch.float32, attn_implementation="eager",
                                                     config=_gguf_config(src))
        _correct_gguf_rope(model, src)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src.path), torch_dtype=torch.float32,
                                                     attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    scaling = getattr(model.config, "rope_scaling", None) or {}
    switch = getattr(model.config, "original_max_position_embeddings", None)
    with torch.no_grad():
        if scaling.get("rope_type", scaling.get("type")) == "longrope" and switch and len(ids) > switch:
            out = _longrope_logits(model, ids, switch)
        else:
            out = model(torch.tensor(ids, dtype=torch.long)[None]).logits[0].float().numpy()
    del model
    return out


def _longrope_logits(model, ids: np.ndarray, switch: int) -> np.ndarray:
    """Logits ``(n, V)`` with longrope switched by position, as the graphs do (see the builder's
    ``_rope_caches``): the first ``switch`` tokens in one call (short factors), the rest one token
    a call with the cache (transformers switches each call by its length: long from then on)."""
    import torch

    r = model(torch.tensor(ids[:switch], dtype=torch.long)[None], use_cache=True)
    out, past = [r.logits[0].float().numpy()], r.past_key_values
    for t in ids[switch:]:
        r = model(torch.tensor([[int(t)]]), past_key_values=past, use_cache=True)
        out.append(r.logits[0].float().numpy())
        past = r.past_key_values
    return np.concatenate(out)


#: what transformers' GGUF loader leaves at its defaults for a mixture of experts and llama.cpp reads
_GGUF_EXPERT_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                       "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")


#: architectures whose GGUF metadata transformers 4.57 does not read at all (its config mapping is
#: keyed by the name it renames the architecture from): a Qwen2-MoE GGUF became a 2048-wide model
_GGUF_CONFIG_UNREAD = ("qwen2_moe",)


def _gguf_config(src):
    """transformers' config of a mixture-of-experts GGUF file, with the expert fields llama.cpp
    reads put back (their widths from the tensors, Qwen3-MoE's renormalized top-k weights), or
    every field the file gives where transformers reads none (the weights still come from its
    loader); ``None`` (transformers' own) for other files."""
    from transformers import AutoConfig

    if "num_experts" not in src.hf_config:
        return None
    config = AutoConfig.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    unread = src.spec.architecture in _GGUF_CONFIG_UNREAD
    for key, value in src.hf_config.items():
        if key in _GGUF_EXPERT_FIELDS or (unread and key != "model_type" and value is not None):
            setattr(config, key, value)
    return config


def _correct_gguf_rope(model, src) -> None:
    """Put back into transformers' model of a GGUF file the rotary settings its GGUF loader drops and
    llama.cpp keeps: ``rope_freqs`` (Llama 3.1+, applied as llama.cpp does), longrope factors and
    partial rotary (``rope.dimension_count``; Phi-3.5, Phi-4-mini)."""
    import torch

    cfg = src.hf_config
    rotaries = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "freq_factors":  # the divisors the graph was built with
        for _, m in rotaries:
            m.inv_freq = m.inv_freq / torch.tensor(scaling["factors"], dtype=m.inv_freq.dtype)
            m.original_inv_freq = m.inv_freq
        return
    keys = [k for k in ("rope_scaling", "partial_rotary_factor", "original_max_position_embeddings")
            if k in cfg and getattr(model.config, k, None) != cfg[k]]
    if not keys:
        return
    for k in keys:
        setattr(model.config, k, cfg[k])
    for name, m in rotaries:  # rebuilt from the corrected config
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, type(m)(config=model.config))


def compare_logits(ref: np.ndarray, got: np.ndarray, vocab: int) -> dict[str, float]:
    """Compare two ``(n, V)`` logit arrays on the first ``vocab`` columns.

    Returns:
        ``top1_agreement`` (fraction of positions with the same argmax), ``mean_kl``
        (mean over positions of KL(softmax(ref) || softmax(got)), nats), ``max_abs_diff``.
    """
    ref, got = ref[:, :vocab].astype(np.float64), got[:, :vocab].astype(np.float64)
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "positions": int(ref.shape[0]),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "max_abs_diff": float(np.abs(ref - got).max()),
    }
