"""Model families as data: what each one changes in the Llama block, read by one graph builder.

Every family here is the Llama decoder block — RMSNorm, grouped-query attention with rotary
position embedding, a residual add, RMSNorm, a gated MLP, a residual add — plus the differences
its :class:`Family` lists. :func:`read_features` turns a ``config.json`` into the
:class:`Features` the builder implements, and refuses by name every field that would change the
math in a way the builder does not implement: a model is exported exactly or not at all.

The rotary math (:func:`rope_inv_freq`, :func:`rope_tables`) follows transformers'
``modeling_rope_utils`` for each ``rope_type``, computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtimes.rotary import cos_sin, inv_freq

#: transformers' rope types, and ``freq_factors``: a GGUF file's ``rope_freqs`` tensor, per-frequency
#: divisors (llama.cpp's form of Llama 3.1+ rope scaling, computed from the llama3 parameters)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "freq_factors")
# MLP activations as transformers names them -> the builder's three kernels
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}


@dataclass(frozen=True)
class Family:
    """What a model family changes in the Llama block (the defaults are Llama's).

    Attributes:
        norm_offset: RMSNorms multiply by ``norm_offset + weight`` (Gemma: 1).
        embed_scale: the embedding is multiplied by ``sqrt(hidden_size)`` (Gemma).
        qk_norm: RMSNorm of queries and keys before rotary: ``"head"`` over each head (Qwen3,
            Gemma 3), ``"full"`` over the whole projection (OLMo-2), ``""`` none.
        norms: where the block's RMSNorms sit: ``"pre"`` (Llama: before attention and MLP),
            ``"sandwich"`` (Gemma 2/3: also on the attention and MLP outputs, the MLP's input
            norm named ``pre_feedforward_layernorm``), ``"post"`` (OLMo-2: on the outputs only).
        multipliers: Granite's ``embedding_multiplier``, ``residual_multiplier``,
            ``attention_multiplier`` and ``logits_scaling`` are read.
        fused: q/k/v and gate/up are stored as one ``qkv_proj`` and one ``gate_up_proj`` (Phi-3).
        activation_key: the config field naming the MLP activation.
        activation: the activation when the config does not name one.
        attention_bias: q/k/v biases when the config does not say.
        windows: which layers a ``sliding_window`` applies to: ``"none"``, ``"all"`` (Mistral,
            Phi-3) or ``"layer_types"`` (the config's per-layer list: Qwen2/3, Gemma 2/3, SmolLM3).
        query_pre_attn_scalar: attention scale is ``query_pre_attn_scalar ** -0.5`` (Gemma 2/3).
        softcap: attention and final-logit soft-capping fields are read (Gemma 2, Gemma 3).
        local_rope: sliding layers use ``rope_local_base_freq`` with default rope (Gemma 3).
        no_rope_layers: the config's ``no_rope_layers`` turns rotary off per layer (SmolLM3).
        partial_rotary: ``partial_rotary_factor`` rotates only the head's first dimensions (Phi-3).
        window_pattern: configs without ``layer_types``: every ``n``-th layer is full, the others
            sliding (``sliding_window_pattern`` overrides; Gemma 2: 2, Gemma 3: 6).
        moe: the MLP is a mixture of experts, its weights named as in ``"mixtral"``
            (``block_sparse_moe.experts.N.w1/w3/w2``, top-k weights always renormalized) or
            ``"qwen"`` (``mlp.experts.N.gate_proj/up_proj/down_proj``, ``norm_topk_prob``, an
            optional gated shared expert, dense layers by ``mlp_only_layers`` and
            ``decoder_sparse_step``) or ``"granite"`` (``block_sparse_moe.input_linear`` /
            ``output_linear`` hold every expert in one tensor, top-k weights renormalized, an
            ungated ``shared_mlp`` when ``shared_intermediate_size``); ``""``: a dense MLP.
        gguf_arch: the architecture name in GGUF files (``None``: not read from GGUF).
    """

    norm_offset: float = 0.0
    embed_scale: bool = False
    qk_norm: str = ""
    norms: str = "pre"
    multipliers: bool = False
    fused: bool = False
    activation_key: str = "hidden_act"
    activation: str = "silu"
    attention_bias: bool = False
    windows: str = "none"
    query_pre_attn_scalar: bool = False
    softcap: bool = False
    local_rope: bool = False
    no_rope_layers: bool = False
    partial_rotary: bool = False
    window_pattern: int = 0
    moe: str = ""
    gguf_arch: str | None = None


_GEMMA = dict(norm_offset=1.0, embed_scale=True, activation="gelu_pytorch_tanh")
FAMILIES: dict[str, Family] = {
    "llama": Family(gguf_arch="llama"),
    "mistral": Family(windows="all"),
    "qwen2": Family(attention_bias=True, windows="layer_types", gguf_arch="qwen2"),
    "qwen3": Family(qk_norm="head", windows="layer_types", gguf_arch="qwen3"),
    "gemma": Family(**_GEMMA),  # no GGUF: transformers reads no Gemma 1 GGUF file (tokenizer, full check)
    "gemma2": Family(**_GEMMA, norms="sandwich", activation_key="hidden_activation", windows="layer_types",
                     query_pre_attn_scalar=True, softcap=True, window_pattern=2, gguf_arch="gemma2"),
    "gemma3_text": Family(**_GEMMA, norms="sandwich", qk_norm="head", activation_key="hidden_activation",
                          windows="layer_types", query_pre_attn_scalar=True, softcap=True, local_rope=True,
                          window_pattern=6, gguf_arch="gemma3"),
    "phi3": Family(fused=True, windows="all", partial_rotary=True, gguf_arch="phi3"),
    "smollm3": Family(windows="layer_types", no_rope_layers=True),
    "granite": Family(multipliers=True),
    "olmo2": Family(norms="post", qk_norm="full"),
    "mixtral": Family(windows="all", moe="mixtral"),
    "qwen2_moe": Family(attention_bias=True, moe="qwen", gguf_arch="qwen2moe"),
    "qwen3_moe": Family(qk_norm="head", moe="qwen", gguf_arch="qwen3moe"),
    "olmoe": Family(qk_norm="full", moe="qwen"),
    "granitemoe": Family(multipliers=True, moe="granite"),
    "granitemoeshared": Family(multipliers=True, moe="granite"),
}
GGUF_FAMILIES = {f.gguf_arch: name for name, f in FAMILIES.items() if f.gguf_arch}


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding of one kind of layer, as transformers computes it.

    Attributes:
        theta: base frequency.
        dim: rotated dimensions of a head (``head_dim * partial_rotary_factor``).
        scaling: the config's ``rope_scaling`` as sorted ``(key, value)`` pairs (hashable); empty
            for default rope.
        max_position_embeddings: the config's ``max_position_embeddings``.
        original_max_position_embeddings: the config's top-level field (longrope, Phi-3), or 0.
    """

    theta: float
    dim: int
    scaling: tuple = ()
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 0

    @property
    def kind(self) -> str:
        s = dict(self.scaling)
        return s.get("rope_type", s.get("type")) or "default"

    def switch_length(self) -> int | None:
        """longrope: past this many positions transformers switches to the long factors."""
        return (self.original_max_position_embeddings or self.max_position_embeddings) if self.kind == "longrope" else None


def rope_inv_freq(rope: Rope, long: bool = False) -> tuple[np.ndarray, float]:
    """Inverse frequencies float64 ``(dim / 2,)`` and the factor cos and sin are multiplied by.

    Args:
        rope: the layer kind's rotary settings.
        long: longrope only: the long factors (positions past :meth:`Rope.switch_length`).
    """
    s, dim = dict(rope.scaling), rope.dim
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv = inv_freq(dim, rope.theta)
    kind = rope.kind
    if kind in ("default", "dynamic"):  # dynamic equals default up to max_position_embeddings
        return inv, 1.0
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "llama3":
        factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    if kind == "freq_factors":  # llama.cpp: theta_i = position * base ** (-2i / dim) / factor_i
        factors = np.asarray(s["factors"], np.float64)
        if factors.shape != inv.shape or not (np.isfinite(factors) & (factors > 0)).all():
            raise ExportError(f"rope_freqs: {factors.size} factors for {inv.size} frequencies, or a factor that is "
                              "not a positive number; the file is damaged or for another model")
        return inv / factors, 1.0
    if kind == "yarn":
        return _yarn(rope, s, inv)
    if kind == "longrope":
        original = rope.original_max_position_embeddings
        factor = rope.max_position_embeddings / original if original else s.get("factor", 1.0)
        original = original or rope.max_position_embeddings
        attention = s.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = np.asarray(s["long_factor" if long else "short_factor"], np.float64)
        return 1.0 / (ext * rope.theta ** exponents), float(attention)
    raise ExportError(f"rope_type {kind!r} is not supported; allowed: {', '.join(ROPE_TYPES)}")


def _yarn(rope: Rope, s: dict, inv: np.ndarray) -> tuple[np.ndarray, float]:
    dim, base, factor = rope.dim, rope.theta, s["factor"]
    original = s.get("original_max_position_embeddings") or rope.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        attention = (mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
                     if s.get("mscale") and s.get("mscale_all_dim") else mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0, 1)
    extrapolation = 1 - ramp
    return inv / factor * (1 - extrapolation) + inv * extrapolation, float(attention)


def rope_tables(rope: Rope, max_context: int, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` float64 ``(max_context, dim / 2)`` for positions ``0 .. max_context - 1``."""
    inv, attention = rope_inv_freq(rope, long)
    return cos_sin(np.arange(max_context), inv, attention)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite-MoE), as transformers computes it:
    ``softmax(x @ router.T)``, the ``top_k`` largest kept (renormalized to sum 1 when
    ``normalize``), each kept expert's gated MLP weighted by its probability and summed, plus the
    shared expert weighted by ``sigmoid(x @ shared_gate.T)`` where there is one (Qwen2-MoE) or
    by 1 (Granite).

    Attributes:
        count: routed experts.
        top_k: experts per token.
        normalize: the kept probabilities are divided by their sum.
        intermediate_size: one routed expert's MLP width.
        shared_intermediate_size: the shared expert's MLP width, 0 when there is none.
        sparse: per layer, whether its MLP is the mixture (else a dense MLP of the config's
            ``intermediate_size``).
    """

    count: int
    top_k: int
    normalize: bool
    intermediate_size: int
    shared_intermediate_size: int
    sparse: tuple[bool, ...]


@dataclass(frozen=True)
class Features:
    """What one model's graph needs beyond the Llama block (read from its config by :func:`read_features`).

    Attributes:
        family: the :class:`Family`.
        activation: ``silu``, ``gelu_tanh`` or ``gelu`` (erf).
        rope: the rotary settings of full-attention layers.
        local_rope: the rotary settings of sliding layers, when they differ (Gemma 3).
        windows: per layer, the sliding window (tokens a position attends, itself included) or -1.
        rotary: per layer, whether rotary is applied (SmolLM3 leaves some layers without).
        attention_scale: multiplies ``q . k`` (``head_dim ** -0.5`` unless the family says).
        attn_softcap: ``softcap * tanh(score / softcap)`` on attention scores, 0 = off.
        final_softcap: the same on the logits, 0 = off.
        embedding_multiplier: multiplies the embedding (Granite; Gemma's sqrt(hidden) is separate).
        residual_multiplier: multiplies each attention and MLP output before its residual add.
        logits_scaling: divides the logits.
        experts: the mixture-of-experts MLP, ``None`` for a dense one.
    """

    family: Family
    activation: str
    rope: Rope
    local_rope: Rope | None
    windows: tuple[int, ...]
    rotary: tuple[bool, ...]
    attention_scale: float
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    experts: Experts | None = None

    @property
    def plain(self) -> bool:
        """The Llama block with default rope and full attention (what npu graphs implement)."""
        f = self.family
        return (f.norm_offset == 0 and not (f.embed_scale or f.qk_norm or f.fused or f.multipliers) and f.norms == "pre"
                and self.activation == "silu" and self.rope.kind == "default" and self.local_rope is None
                and all(w < 0 for w in self.windows) and all(self.rotary) and not self.attn_softcap
                and not self.final_softcap and self.experts is None and (self.embedding_multiplier, self.residual_multiplier,
                                                self.logits_scaling) == (1.0, 1.0, 1.0))


def _hashable(scaling: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))


def read_features(cfg: dict[str, Any], model_type: str, head_dim: int, num_layers: int, where: str) -> Features:
    """The :class:`Features` of a ``config.json``; an :class:`ExportError` names any field the builder lacks.

    Args:
        cfg: the config (Hugging Face field names).
        model_type: a key of :data:`FAMILIES`.
        head_dim: width of one head.
        num_layers: decoder blocks.
        where: the model's path, for messages.
    """
    fam = FAMILIES[model_type]
    act_name = cfg.get(fam.activation_key) or fam.activation
    if act_name not in ACTIVATIONS:
        raise ExportError(f"{where}: {fam.activation_key} {act_name!r} is not supported; allowed: "
                          f"{', '.join(ACTIVATIONS)}")
    partial = float(cfg.get("partial_rotary_factor") or 1.0)
    if partial != 1.0 and not fam.partial_rotary:
        raise ExportError(f"{where}: partial_rotary_factor {partial!r} is not supported for {model_type}; allowed: 1.0 "
                          "(rotary over the whole head)")
    dim = int(head_dim * partial)
    if dim != head_dim and (dim // 2) % 8:
        raise ExportError(f"{where}: partial_rotary_factor {partial!r} rotates {dim} of {head_dim} dimensions; "
                          "onnxruntime's GroupQueryAttention needs a multiple of 16")
    scaling = dict(cfg.get("rope_scaling") or {})
    max_pos = int(cfg.get("max_position_embeddings") or 4096)
    rope = Rope(float(cfg.get("rope_theta", 10000.0)), dim, _hashable(scaling), max_pos,
                int(cfg.get("original_max_position_embeddings") or 0))
    if rope.kind not in ROPE_TYPES:
        raise ExportError(f"{where}: rope_scaling {scaling!r} is not supported; allowed rope_type: {', '.join(ROPE_TYPES)}")
    try:
        rope_inv_freq(rope)
    except KeyError as e:
        raise ExportError(f"{where}: rope_scaling {scaling!r} lacks {e.args[0]!r}") from None
    windows = _windows(cfg, fam, num_layers, where)
    local = None
    if fam.local_rope and any(w > 0 for w in windows):
        local = Rope(float(cfg.get("rope_local_base_freq", 10000.0)), dim, (), max_pos)
    rotary = tuple(bool(r) for r in cfg.get("no_rope_layers") or [1] * num_layers) if fam.no_rope_layers \
        else (True,) * num_layers
    if len(rotary) != num_layers:
        raise ExportError(f"{where}: no_rope_layers has {len(rotary)} entries for {num_layers} layers")
    scale = float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5 if fam.query_pre_attn_scalar else head_dim ** -0.5
    caps = (float(cfg.get("attn_logit_softcapping") or 0.0), float(cfg.get("final_logit_softcapping") or 0.0)) \
        if fam.softcap else (0.0, 0.0)
    if cfg.get("clip_qkv") is not None:  # OLMoE, OLMo: clamps q, k and v
        raise ExportError(f"{where}: clip_qkv {cfg['clip_qkv']!r} is not supported; allowed: null (no clamping)")
    if cfg.get("use_bidirectional_attention"):
        raise ExportError(f"{where}: use_bidirectional_attention is not supported (a decoder attends to the past only)")
    mult = {}
    if fam.multipliers:
        mult = {k: float(cfg.get(k) or 1.0) for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")}
        scale = float(cfg.get("attention_multiplier") or head_dim ** -0.5)
    experts = _experts(cfg, fam, num_layers, where) if fam.moe else None
    return Features(fam, ACTIVATIONS[act_name], rope, local, windows, rotary, scale, *caps, **mult, experts=experts)


def _experts(cfg: dict[str, Any], fam: Family, num_layers: int, where: str) -> Experts:
    """The :class:`Experts` of a mixture-of-experts config (Mixtral's or Qwen's field names)."""
    def positive(key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExportError(f"{where}: {key} {value!r} is not allowed; allowed: a positive integer")
        return value

    if fam.moe in ("mixtral", "granite"):  # Granite: softmax over the top-k logits, the same weights
        count = positive("num_local_experts", cfg.get("num_local_experts"))
        key = "shared_intermediate_size"
        shared = positive(key, cfg[key]) if fam.moe == "granite" and cfg.get(key) else 0
        inter, normalize, sparse = cfg.get("intermediate_size"), True, (True,) * num_layers
    else:
        count = positive("num_experts", cfg.get("num_experts"))
        # OLMoE's experts are intermediate_size wide (it has no moe_intermediate_size)
        inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
        normalize = bool(cfg.get("norm_topk_prob", False))
        key = "shared_expert_intermediate_size"
        shared = positive(key, cfg[key]) if cfg.get(key) else 0
        dense_layers, step = set(cfg.get("mlp_only_layers") or ()), positive("decoder_sparse_step",
                                                                              cfg.get("decoder_sparse_step", 1))
        sparse = tuple(i not in dense_layers and (i + 1) % step == 0 for i in range(num_layers))
    top_k = positive("num_experts_per_tok", cfg.get("num_experts_per_tok"))
    if top_k > count:
        raise ExportError(f"{where}: num_experts_per_tok {top_k} exceeds the {count} experts; allowed: 1-{count}")
    return Experts(count, top_k, normalize, positive("the experts' intermediate size", inter), shared, sparse)


def _windows(cfg: dict[str, Any], fam: Family, num_layers: int, where: str) -> tuple[int, ...]:
    window = cfg.get("sliding_window")
    if fam.windows == "all" and window:
        return (int(window),) * num_layers
    types = cfg.get("layer_types")
    if fam.windows == "layer_types" and types:
        if len(types) != num_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ExportError(f"{where}: layer_types {types!r}: allowed one of full_attention, sliding_attention "
                              f"per layer ({num_layers})")
        if "sliding_attention" in types and not window:
            raise ExportError(f"{where}: layer_types has sliding layers but sliding_window is {window!r}")
        return tuple(int(window) if t == "sliding_attention" else -1 for t in types)
    if fam.window_pattern and window:  # configs older than layer_types, as transformers fills them in
        n = int(cfg.get("sliding_window_pattern") or fam.window_pattern)
        return tuple(int(window) if (i + 1) % n else -1 for i in range(num_layers))
    if fam.windows == "layer_types" and cfg.get("use_sliding_window") and window:  # configs older than layer_types
        first = int(cfg.get("max_window_layers", 0))
        return tuple(int(window) if i >= first else -1 for i in range(num_layers))
    if fam.windows == "none" and (cfg.get("use_sliding_window") or cfg.get("layer_types")):
        raise ExportError(f"{where}: sliding-window attention is not part of this model type; refusing the config")
    return (-1,) * num_layers
