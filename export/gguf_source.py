"""A ``.gguf`` file as a :class:`~edgellm.export.source.Source`: its configuration from the GGUF
metadata, its tensors under Hugging Face names (llama.cpp's q/k row order undone), each
dequantized to float32 one at a time, and its quantized blocks available to keep exactly."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ExportError
from edgellm.export.families import FAMILIES, GGUF_FAMILIES, Family
from edgellm.export.source import EMBED, FINAL_NORM, LM_HEAD, Source, spec_from_hf_config



#: a stacked expert tensor ``(experts, out, in)``; expert j's matrix is ``mlp.experts.<j>.<role>.weight``
STACKED = "mlp.experts.%s.weight"
_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+_proj)\.weight")

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    # mixtures of experts (Qwen2-MoE, Qwen3-MoE): the router, every expert stacked in one tensor per
    # role (read one expert at a time, see GGUFSource.tensor), the shared expert and its gate
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": STACKED % "gate_proj",
    "ffn_up_exps.weight": STACKED % "up_proj",
    "ffn_down_exps.weight": STACKED % "down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# families whose attention output has its own norm call the MLP's input norm pre_feedforward_layernorm
_GGUF_SANDWICH = {"ffn_norm.weight": "pre_feedforward_layernorm.weight"}
# families storing q/k/v and gate/up as one matrix each (Phi-3): llama.cpp's ffn_up holds gate then up
_GGUF_FUSED = {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"}
_GGUF_GLOBAL = {"token_embd.weight": EMBED, "output_norm.weight": FINAL_NORM, "output.weight": LM_HEAD}


def _hf_name(gguf_name: str, family: Family) -> str | None:
    if gguf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    names = _GGUF_LAYER | (_GGUF_SANDWICH if family.norms == "sandwich" else {}) | (_GGUF_FUSED if family.fused else {})
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None


def _unpermute_llama(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> Hugging Face rotate_half).

    llama.cpp's converter writes a head's rows ``(2, half)`` as ``(half, 2)``
    (``reshape(heads, 2, half).swapaxes(1, 2)``); this is its inverse, ``reshape(heads, half,
    2).swapaxes(1, 2)`` (the same op is its own inverse only when ``half`` is 2).
    """
    out, dim = w.shape[0], w.shape[1:]
    return w.reshape(heads, out // heads // 2, 2, *dim).swapaxes(1, 2).reshape(out, *dim)


class GGUFSource(Source):
    """A GGUF file; quantized tensors are dequantized to float32 one at a time."""

    kind = "gguf"

    def __init__(self, path: Path) -> None:
        import gguf  # export extra

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the gguf package raises bare ValueErrors and struct errors
            raise ExportError(f"{path} is not a readable GGUF file: {e}") from e
        self._gguf = gguf
        self.fields = {k: self._field(k) for k in self.reader.fields}
        arch = self.fields.get("general.architecture")
        if arch not in GGUF_FAMILIES:
            raise ExportError(
                f"{path}: GGUF architecture {arch!r} is not supported; allowed: {', '.join(GGUF_FAMILIES)}"
            )
        self.family = FAMILIES[GGUF_FAMILIES[arch]]
        self._tensors = {}
        for t in self.reader.tensors:
            hf = _hf_name(t.name, self.family)
            if hf:
                self._tensors[hf] = t
        self._stacked: dict[str, np.ndarray] = {}  # the last stacked expert tensors read (gate, up, down)
        self.hf_config = self._config(arch)  # also what transformers' run of the file is corrected with
        self.spec = spec_from_hf_config(self.hf_config, str(path))

    def _field(self, key: str) -> Any:
        f = self.reader.fields[key]
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            return None  # large; read on demand by the tokenizer converter
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed
            return None

    def _config(self, arch: str) -> dict[str, Any]:
        """The GGUF metadata as a Hugging Face ``config.json`` (what transformers' GGUF loader reads)."""
        f = lambda key, default=None: self.fields.get(f"{arch}.{key}", default)  # noqa: E731
        heads = int(f("attention.head_count"))
        hidden = int(f("embedding_length"))
        head_dim = int(f("attention.key_length") or hidden // heads)
        cfg = {
            "model_type": GGUF_FAMILIES[arch], "hidden_size": hidden,
            "intermediate_size": int(f("feed_forward_length") or f("expert_feed_forward_length")),
            "num_hidden_layers": int(f("block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(f("attention.head_count_kv") or heads), "head_dim": head_dim,
            "vocab_size": int(self._tensors[EMBED].shape[1]),
            "rms_norm_eps": float(f("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(f("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(f("context_length", 4096)),
            "tie_word_embeddings": LM_HEAD not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            # GGUF files are made for llama.cpp, which scales attention by head_dim ** -0.5 here
            "query_pre_attn_scalar": head_dim,
            "attn_logit_softcapping": f("attn_logit_softcapping"),
            "final_logit_softcapping": f("final_logit_softcapping"),
        }
        if f("attention.sliding_window"):
            cfg["sliding_window"] = int(f("attention.sliding_window"))
        return cfg | self._rope_config(f, head_dim) | self._experts_config(f, arch)

    def _experts_config(self, f, arch: str) -> dict[str, Any]:
        """A mixture of experts' config fields as llama.cpp runs the file: widths from the stacked
        and shared tensors, top-k weights renormalized for Qwen3-MoE only (llama.cpp's ``norm_w``),
        every layer sparse."""
        if not f("expert_count"):
            return {}
        if not self.family.moe:  # Mixtral's GGUF files say llama
            moe = sorted(a for a, name in GGUF_FAMILIES.items() if FAMILIES[name].moe)
            raise ExportError(f"{self.path}: a mixture of experts of GGUF architecture {arch!r} is not supported; "
                              f"allowed: {', '.join(moe)} (or export the model's Hugging Face folder)")
        if not f("expert_used_count"):
            raise ExportError(f"{self.path}: {arch}.expert_count is set but {arch}.expert_used_count (experts per "
                              "token) is missing; a mixture of experts needs both")
        scale = f("expert_weights_scale")
        if scale not in (None, 0, 1):
            raise ExportError(f"{self.path}: {arch}.expert_weights_scale {scale!r} is not supported; allowed: 1")
        width = lambda name: int(self._tensors[name].shape[1]) if name in self._tensors else 0  # noqa: E731
        return {"num_experts": int(f("expert_count")), "num_experts_per_tok": int(f("expert_used_count")),
                "moe_intermediate_size": width("model.layers.0." + STACKED % "gate_proj"),
                "shared_expert_intermediate_size": width("model.layers.0.mlp.shared_expert.gate_proj.weight"),
                "norm_topk_prob": arch == "qwen3moe", "decoder_sparse_step": 1, "mlp_only_layers": []}

    def _rope_config(self, f, head_dim: int) -> dict[str, Any]:
        """The config's rotary fields: partial rotary (``rope.dimension_count``), and rope scaling
        from llama.cpp's tensors (Llama 3.1+ ``rope_freqs``; Phi-3.5/4's ``rope_factors_long`` and
        ``_short``: longrope) or from its metadata (``rope.scaling.type``)."""
        cfg: dict[str, Any] = {}
        rotated = f("rope.dimension_count")
        if rotated and int(rotated) != head_dim:
            cfg["partial_rotary_factor"] = int(rotated) / head_dim
        original = f("rope.scaling.original_context_length")
        factors, long, short = (self._f32_tensor(n) for n in ("rope_freqs", "rope_factors_long", "rope_factors_short"))
        kind = f("rope.scaling.type")
        if factors is not None:  # Llama 3.1+: the llama3 scaling as llama.cpp applies it
            cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": tuple(float(x) for x in factors)}
        elif long is not None and short is not None:
            cfg["rope_scaling"] = {"rope_type": "longrope", "long_factor": [float(x) for x in long],
                                   "short_factor": [float(x) for x in short]}
            if f("rope.scaling.attn_factor") is not None:
                cfg["rope_scaling"]["attention_factor"] = float(f("rope.scaling.attn_factor"))
            if original:
                cfg["original_max_position_embeddings"] = int(original)
        elif kind and kind != "none":
            cfg["rope_scaling"] = {"rope_type": kind, "factor": float(f("rope.scaling.factor", 1.0))}
            if original:
                cfg["rope_scaling"]["original_max_position_embeddings"] = int(original)
        return cfg

    def _f32_tensor(self, name: str) -> np.ndarray | None:
        """A small float32 tensor of the file's (rope factors), flat; ``None`` if absent."""
        t = next((t for t in self.reader.tensors if t.name == f"{name}.weight"), None)
        if t is None:
            return None
        if t.tensor_type != self._gguf.GGMLQuantizationType.F32:
            raise ExportError(f"{self.path}: {name} is {t.tensor_type.name}; allowed: F32")
        return np.asarray(t.data, np.float32).reshape(-1)

    def has(self, name: str) -> bool:
        m = _EXPERT.fullmatch(name)
        return name in self._tensors if m is None else f"{m[1]}.{m[3]}.weight" in self._tensors

    def tensor(self, name: str) -> np.ndarray:
        m = _EXPERT.fullmatch(name)
        if m is not None:  # one expert of a stacked tensor, dequantized once for all its experts
            stacked = f"{m[1]}.{m[3]}.weight"
            if stacked not in self._stacked:
                if len(self._stacked) == 3:
                    del self._stacked[next(iter(self._stacked))]
                self._stacked[stacked] = self.tensor(stacked)
            return self._stacked[stacked][int(m[2])]
        if name not in self._tensors:
            raise ExportError(f"{self.path}: weight {name!r} not found in the GGUF file")
        t = self._tensors[name]
        arr = self._gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(x) for x in reversed(t.shape))
        arr = arr.reshape(shape)
        if name.endswith("shared_expert_gate.weight"):
            arr = arr.reshape(1, -1)  # llama.cpp stores the shared expert's gate as a vector
        if self.family.norm_offset and name.endswith("norm.weight"):
            arr = arr - np.float32(self.family.norm_offset)  # llama.cpp stores Gemma's norms as (1 + w)
        if self.spec.architecture == "llama":
            if name.endswith("q_proj.weight"):
                arr = _unpermute_llama(arr, self.spec.num_heads)
            elif name.endswith("k_proj.weight"):
                arr = _unpermute_llama(arr, self.spec.num_kv_heads)
        return arr

    def native(self, name: str):
        """Weight ``name`` as its GGUF blocks, when MatMulNBits can hold them exactly (else ``None``)."""
        from edgellm.export.gguf_blocks import native_weight

        t = self._tensors.get(name)
        if t is None or len(t.shape) != 2:
            return None
        n, k = (int(x) for x in reversed(t.shape))
        w = native_weight(t.data, t.tensor_type.name, (n, k))
        if w is not None and self.spec.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.spec.num_heads if name.endswith("q_proj.weight") else self.spec.num_kv_heads
            w = w.permute_rows(_unpermute_llama(np.arange(n)[:, None], heads)[:, 0])
        return w

    def quant_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "gguf_tensor_types": self.quant_types()}
