"""Source models: read a decoder's configuration and weights as numpy arrays.

Two readers, both without torch and without holding the whole model in memory:

* :class:`HFSource` reads a Hugging Face folder (``config.json`` + ``*.safetensors``),
  memory-mapping the safetensors files (F32, F16 and BF16 are decoded here).
* :class:`~edgellm.export.gguf_source.GGUFSource` reads a ``.gguf`` file with the ``gguf``
  package and dequantizes one tensor at a time to float32.

Both expose weights under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``) with
Hugging Face shapes (``(out_features, in_features)``), so the graph builder has one vocabulary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, ExportError
from edgellm.export.families import FAMILIES, Experts, Family, Features, read_features


SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


@dataclass(frozen=True)
class DecoderSpec:
    """Shape of a Llama-family decoder (RMSNorm, rotary attention with GQA, gated MLP).

    Attributes:
        architecture: the Hugging Face ``model_type`` (a key of :data:`FAMILIES`).
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
        features: what the family changes in the Llama block (:class:`~edgellm.export.families.Features`).
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
    features: Features

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
        if self.head_dim % 16:
            raise ConfigError(f"head_dim={self.head_dim}: onnxruntime's GroupQueryAttention needs a multiple of 16")


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


def block_names(i: int, family: Family) -> dict[str, list[str] | str]:
    """Weight names of block ``i`` by role for ``family``: ``qkv`` and ``gate_up`` are lists
    whose matrices are stacked along the output dimension; norms a family lacks are absent."""
    p, n = f"model.layers.{i}.", layer_names(i)
    names: dict[str, list[str] | str] = {
        "o": n["o"], "down": n["down"],
        "qkv": [p + "self_attn.qkv_proj.weight"] if family.fused else [n["q"], n["k"], n["v"]],
        "gate_up": [p + "mlp.gate_up_proj.weight"] if family.fused else [n["gate"], n["up"]],
    }
    if family.norms != "post":  # norms of the attention's and the MLP's inputs
        names["input_norm"] = n["input_norm"]
        names["mlp_norm"] = p + ("pre_feedforward_layernorm.weight" if family.norms == "sandwich"
                                 else "post_attention_layernorm.weight")
    if family.norms != "pre":  # norms of their outputs
        names["attn_out_norm"] = p + "post_attention_layernorm.weight"
        names["mlp_out_norm"] = p + "post_feedforward_layernorm.weight"
    if family.qk_norm:
        names["q_norm"], names["k_norm"] = p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"
    return names


def expert_names(i: int, family: Family, experts: Experts) -> dict[str, list[str] | str]:
    """Weight names of block ``i``'s mixture-of-experts MLP by role: ``router``; ``gate_up``, every
    expert's gate then every expert's up (the shared expert last in each half), stacked along the
    output dimension; ``down``, every expert's down projection in the same order, joined along the
    input dimension; ``shared_gate`` when the shared expert is gated (Qwen2-MoE).

    Granite stacks its experts in one tensor per role, ``(count, out, in)``: a name then picks a
    piece of it, ``name[j]`` expert ``j`` and ``name[j][a:b]`` its rows ``a`` to ``b`` (see
    :func:`piece`)."""
    p, count, width = f"model.layers.{i}.", experts.count, experts.intermediate_size
    shared = experts.shared_intermediate_size
    if family.moe == "granite":
        up, down = p + "block_sparse_moe.input_linear.weight", p + "block_sparse_moe.output_linear.weight"
        s_up, s_down = p + "shared_mlp.input_linear.weight", p + "shared_mlp.output_linear.weight"
        return {"router": p + "block_sparse_moe.router.layer.weight",
                "gate_up": [f"{up}[{j}][0:{width}]" for j in range(count)] + [f"{s_up}[0:{shared}]"] * (shared > 0)
                + [f"{up}[{j}][{width}:{2 * width}]" for j in range(count)] + [f"{s_up}[{shared}:{2 * shared}]"] * (shared > 0),
                "down": [f"{down}[{j}]" for j in range(count)] + [s_down] * (shared > 0)}
    if family.moe == "mixtral":
        e = [f"{p}block_sparse_moe.experts.{j}." for j in range(count)]
        return {"router": p + "block_sparse_moe.gate.weight", "gate_up": [x + "w1.weight" for x in e] +
                [x + "w3.weight" for x in e], "down": [x + "w2.weight" for x in e]}
    e = [f"{p}mlp.experts.{j}." for j in range(count)] + ([p + "mlp.shared_expert."] if shared else [])
    names: dict[str, list[str] | str] = {
        "router": p + "mlp.gate.weight", "gate_up": [x + "gate_proj.weight" for x in e] + [x + "up_proj.weight" for x in e],
        "down": [x + "down_proj.weight" for x in e]}
    if shared:
        names["shared_gate"] = p + "mlp.shared_expert_gate.weight"
    return names


_PIECE = re.compile(r"^(?P<base>.+?)(?:\[(?P<index>\d+)\])?(?:\[(?P<start>\d+):(?P<stop>\d+)\])?$")


def piece(name: str) -> tuple[str, int | None, tuple[int, int] | None]:
    """Split a weight name into ``(tensor name, index along its first axis or None, (start, stop)
    rows of that or None)``: ``"w[3][0:64]"`` is ``("w", 3, (0, 64))``, ``"w"`` is ``("w", None, None)``."""
    m = _PIECE.match(name)
    assert m is not None, name
    rows = (int(m["start"]), int(m["stop"])) if m["start"] is not None else None
    return m["base"], None if m["index"] is None else int(m["index"]), rows


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
    """Build a :class:`DecoderSpec` from a ``config.json`` dict, refusing what we cannot run exactly."""
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"{where}: model_type {arch!r} is not supported; allowed: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    return DecoderSpec(
        architecture=arch,
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        attention_bias=bool(cfg.get("attention_bias", FAMILIES[arch].attention_bias)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        source_context_length=int(cfg.get("max_position_embeddings", 4096)),
        features=read_features(cfg, arch, head_dim, layers, where),
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
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ExportError(
                f"{folder}: no *.safetensors weights (pytorch_model.bin is not read: no pickle)"
            )
        self._index = safetensors_index(files)
        self._stacked_cache: dict[str, np.ndarray] = {}  # see _stacked

    def has(self, name: str) -> bool:
        return piece(name)[0] in self._index

    def tensor(self, name: str) -> np.ndarray:
        """Weight ``name``, or a piece of it (``name[j]``, ``name[j][a:b]``: see :func:`piece`)."""
        base, index, rows = piece(name)
        if base not in self._index:
            raise ExportError(f"{self.path}: weight {base!r} not found in the safetensors files")
        if index is None and rows is None:
            return safetensors_tensor(self._index[base], base)
        w = self._stacked(base)
        w = w if index is None else w[index]
        return np.ascontiguousarray(w if rows is None else w[rows[0]:rows[1]])

    def _stacked(self, base: str) -> np.ndarray:
        """A tensor read once for its pieces (Granite's experts: every expert's piece reads it);
        this source keeps the last two (a layer's experts and its shared expert alternate)."""
        if base not in self._stacked_cache:
            self._stacked_cache = dict(list(self._stacked_cache.items())[-1:])
            self._stacked_cache[base] = safetensors_tensor(self._index[base], base)
        return self._stacked_cache[base]


def safetensors_index(files: list[Path]) -> dict[str, tuple[Path, dict[str, Any], int]]:
    """Every tensor of ``files`` by name: ``(file, header entry, data offset)`` (headers only are read).

    Raises:
        ExportError: a file is not a safetensors file.
    """
    index = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 2 <= n <= 1 << 28 else None
        except (OSError, ValueError) as e:
            raise ExportError(f"{f}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise ExportError(f"{f}: not a safetensors file (no JSON header)")
        for name, meta in header.items():
            if name != "__metadata__":
                index[name] = (f, meta, 8 + n)
    return index


def safetensors_tensor(entry: tuple[Path, dict[str, Any], int], name: str) -> np.ndarray:
    """One tensor of a :func:`safetensors_index` as float32 (F32, F16 and BF16; memory-mapped)."""
    f, meta, base = entry
    dtype = _ST_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise ExportError(f"{f}: {name} has dtype {meta['dtype']}; allowed F32, F16, BF16")
    start, end = meta["data_offsets"]
    raw = np.memmap(f, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
    arr = raw.view(dtype).reshape(meta["shape"])
    if meta["dtype"] == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)


def open_source(model: str | Path) -> Source:
    """Open ``model``: a local HF folder, a ``.gguf`` file, or a hub id (downloaded when online).

    Raises:
        ExportError: the path does not exist or is not a model, or a hub id cannot be fetched.
    """
    from edgellm.export.gguf_source import GGUFSource

    p = Path(model).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return GGUFSource(p)
    if p.is_dir():
        return _hf_source(p)
    if p.exists():
        raise ExportError(f"{p} is neither a .gguf file nor a Hugging Face model folder")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) and not str(model).startswith((".", "/")):
        return _hf_source(_download_hub(str(model)))
    raise ExportError(
        f"model {str(model)!r} not found: give a Hugging Face folder, a .gguf file or a hub id "
        "like Qwen/Qwen2.5-Coder-1.5B-Instruct"
    )


def _hf_source(folder: Path) -> Source:
    """A native :class:`HFSource`, or a generic (optimum) one for a model type without a family record."""
    from edgellm.export.generic import GenericSource, generic_config

    cfg = generic_config(folder)
    return GenericSource(folder, cfg) if cfg is not None else HFSource(folder)


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
