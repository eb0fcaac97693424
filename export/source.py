"""Source models: read a decoder's configuration and weights as numpy arrays.

Two readers, both without torch and without holding the whole model in memory:

* :class:`HFSource` reads a Hugging Face folder (``config.json`` + ``*.safetensors``),
  memory-mapping the safetensors files (F32, F16 and BF16 are decoded here).
* :class:`GGUFSource` reads a ``.gguf`` file with the ``gguf`` package and dequantizes one
  tensor at a time to float32.

Both expose weights under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``) with
Hugging Face shapes (``(out_features, in_features)``), so the graph builder has one vocabulary.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgellm.errors import ConfigError, ExportError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("qwen2", "llama", "mistral")


@dataclass(frozen=True)
class DecoderSpec:
    """Shape of a Llama-family decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP).

    Attributes:
        architecture: ``qwen2``, ``llama`` or ``mistral``.
        hidden_size: width of the residual stream.
        intermediate_size: width of the MLP.
        num_layers: decoder blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA groups).
        head_dim: width of one head.
        vocab_size: logits width (may exceed the tokenizer's size: Qwen pads it).
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: rotary base frequency.
        attention_bias: whether q/k/v projections have a bias (Qwen2 does).
        tie_word_embeddings: lm_head shares the embedding matrix.
        source_context_length: context length the source model was trained for.
    """

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool
    source_context_length: int

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; "
                f"allowed: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )


def layer_names(i: int) -> dict[str, str]:
    """Hugging Face weight names of decoder block ``i``, keyed by role."""
    p = f"model.layers.{i}."
    return {
        "input_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "q_bias": p + "self_attn.q_proj.bias",
        "k_bias": p + "self_attn.k_proj.bias",
        "v_bias": p + "self_attn.v_proj.bias",
        "o": p + "self_attn.o_proj.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


class Source:
    """Interface of a weight source. Subclasses set ``spec`` and implement ``tensor``."""

    spec: DecoderSpec
    path: Path
    kind: str

    def tensor(self, name: str) -> np.ndarray:
        """Return weight ``name`` as a float32 array in Hugging Face layout."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def native(self, name: str):
        """The weight's own quantized blocks (:class:`~edgellm.export.gguf_blocks.NativeWeight`), if any."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}


# --------------------------------------------------------------------------- Hugging Face


def spec_from_hf_config(cfg: dict[str, Any], where: str) -> DecoderSpec:
    """Build a :class:`DecoderSpec` from a ``config.json`` dict, refusing what we cannot run."""
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"{where}: model_type {arch!r} is not supported; allowed: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise ExportError(f"{where}: rope_scaling {rope_scaling!r} is not supported (only default rope)")
    if cfg.get("use_sliding_window") or (arch == "mistral" and cfg.get("sliding_window")):
        raise ExportError(
            f"{where}: sliding-window attention cannot be rolled back exactly; not supported"
        )
    # what the graph builder hard-codes: a config that says otherwise would export a wrong graph
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise ExportError(f"{where}: hidden_act {act!r} is not supported; allowed: silu (the builder's MLP is SwiGLU)")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError(f"{where}: partial_rotary_factor {cfg['partial_rotary_factor']!r} is not supported; "
                          "allowed: 1.0 (rotary over the whole head)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return DecoderSpec(
        architecture=arch,
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        source_context_length=int(cfg.get("max_position_embeddings", 4096)),
    )


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class HFSource(Source):
    """A Hugging Face model folder with safetensors weights, read without torch."""

    kind = "hf"

    def __init__(self, folder: Path) -> None:
        self.path = folder
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise ExportError(f"{folder} is not a Hugging Face model folder: no config.json")
        self.config = json.loads(cfg_path.read_text())
        self.spec = spec_from_hf_config(self.config, str(folder))
        self._index: dict[str, tuple[Path, dict[str, Any], int]] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ExportError(
                f"{folder}: no *.safetensors weights (pytorch_model.bin is not read: no pickle)"
            )
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    self._index[name] = (f, meta, 8 + n)

    def has(self, name: str) -> bool:
        return name in self._index

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._index:
            raise ExportError(f"{self.path}: weight {name!r} not found in the safetensors files")
        f, meta, base = self._index[name]
        dtype = _ST_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ExportError(f"{self.path}: {name} has dtype {meta['dtype']}; allowed F32, F16, BF16")
        start, end = meta["data_offsets"]
        raw = np.memmap(f, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        arr = raw.view(dtype).reshape(meta["shape"])
        if meta["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------- GGUF

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
}
_GGUF_GLOBAL = {"token_embd.weight": EMBED, "output_norm.weight": FINAL_NORM, "output.weight": LM_HEAD}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


def _unpermute_llama(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> Hugging Face rotate_half)."""
    out, dim = w.shape[0], w.shape[1:]
    return w.reshape(heads, 2, out // heads // 2, *dim).swapaxes(1, 2).reshape(out, *dim)


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
        self._tensors = {}
        for t in self.reader.tensors:
            hf = _hf_name(t.name)
            if hf:
                self._tensors[hf] = t
        self.spec = self._spec(arch)

    def _field(self, key: str) -> Any:
        f = self.reader.fields[key]
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            return None  # large; read on demand by the tokenizer converter
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed
            return None

    def _spec(self, arch: str | None) -> DecoderSpec:
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ExportError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; allowed: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        f = self.fields
        heads = int(f[f"{arch}.attention.head_count"])
        hidden = int(f[f"{arch}.embedding_length"])
        embed = self._tensors[EMBED]
        return DecoderSpec(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(f[f"{arch}.feed_forward_length"]),
            num_layers=int(f[f"{arch}.block_count"]),
            num_heads=heads,
            num_kv_heads=int(f.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=int(f.get(f"{arch}.attention.key_length") or hidden // heads),
            vocab_size=int(embed.shape[1]),
            rms_norm_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
            attention_bias=f"model.layers.0.self_attn.q_proj.bias" in self._tensors,
            tie_word_embeddings=LM_HEAD not in self._tensors,
            source_context_length=int(f.get(f"{arch}.context_length", 4096)),
        )

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise ExportError(f"{self.path}: weight {name!r} not found in the GGUF file")
        t = self._tensors[name]
        arr = self._gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(x) for x in reversed(t.shape))
        arr = arr.reshape(shape)
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


def open_source(model: str | Path) -> Source:
    """Open ``model``: a local HF folder, a ``.gguf`` file, or a hub id (downloaded when online).

    Raises:
        ExportError: the path does not exist or is not a model, or a hub id cannot be fetched.
    """
    p = Path(model).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return GGUFSource(p)
    if p.is_dir():
        return HFSource(p)
    if p.exists():
        raise ExportError(f"{p} is neither a .gguf file nor a Hugging Face model folder")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) and not str(model).startswith((".", "/")):
        return HFSource(_download_hub(str(model)))
    raise ExportError(
        f"model {str(model)!r} not found: give a Hugging Face folder, a .gguf file or a hub id "
        "like Qwen/Qwen2.5-Coder-1.5B-Instruct"
    )


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - part of the export extra
        raise ExportError("hub ids need huggingface_hub (pip install 'edgellm[export]')") from e
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"],
            )
        )
    except Exception as e:  # noqa: BLE001 - hub errors are many and all mean the same here
        raise ExportError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "offline? give a local folder or .gguf file instead"
        ) from e


def iter_linear_names(spec: DecoderSpec) -> Iterator[str]:
    for i in range(spec.num_layers):
        n = layer_names(i)
        yield from (n["q"], n["k"], n["v"], n["o"], n["gate"], n["up"], n["down"])
