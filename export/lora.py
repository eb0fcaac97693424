"""LoRA adapters over one exported base: read PEFT folders, check them against the base, add branches.

A LoRA fine-tune changes a linear layer ``y = x @ W.T`` into ``y = x @ W.T + s * (x @ A.T) @ B.T``
(``A`` ``(r, in)``, ``B`` ``(out, r)``, ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
The bundle keeps the base's quantized weights once; each linear layer an adapter may touch (a
*site*: the builder's fused ``l{i}.qkv``, ``l{i}.o``, ``l{i}.gate_up``, ``l{i}.down``) gets a
branch whose two matrices are graph inputs::

    y = base(x) + (x @ lora.<site>.a) @ lora.<site>.b      a: (in, R), b: (R, out)

so one loaded graph serves every adapter: the runtime binds an adapter's matrices per request,
and zero-rank ones (``R = 0``: the branch adds exactly 0) for the base and for sites an adapter
does not touch. A fused site stacks its modules: ``a`` is the modules' ``A.T`` side by side and
``b`` holds each module's ``s * B.T`` in its own rows and output columns (zero elsewhere), so
LoRA on ``q_proj`` and ``v_proj`` is one branch on ``qkv``.

Adapters are stored in the bundle as ``.npz`` files of those matrices (read with
``allow_pickle=False``), hashed in the manifest like every other file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, ExportError
from edgellm.export.families import FAMILIES, Family
from edgellm.export.source import DecoderSpec, block_names, safetensors_index, safetensors_tensor
from edgellm.manifest import ADAPTER_NAME, ModelEntry
SITE_ROLES = ("qkv", "o", "gate_up", "down")
ATTENTION_ROLES = ("qkv", "o")  # a mixture of experts' sites
# adapter_config.json fields that change the math in ways this module does not implement:
# refused by name when set (False / None / empty / "none" mean unset)
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales the merged weight per column",
    "modules_to_save": "modules_to_save replaces whole layers (a full copy of their weights)",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2's Conv1D layout)",
    "lora_bias": "lora_bias adds a trained bias to B",
    "target_parameters": "target_parameters (LoRA on raw parameters such as MoE experts)",
    "layer_replication": "layer_replication duplicates layers",
    "trainable_token_indices": "trainable_token_indices retrains embedding rows",
}


@dataclass(frozen=True)
class Site:
    """One linear layer of the built graph that can take a LoRA branch.

    Attributes:
        tag: the builder's name for it (``l3.qkv``); graph inputs ``lora.<tag>.a`` / ``.b``.
        in_dim: input features.
        out_dim: output features (all modules of a fused site).
        modules: the Hugging Face modules stacked in it, ``(name, first column, end column)``.
    """

    tag: str
    in_dim: int
    out_dim: int
    modules: tuple[tuple[str, int, int], ...]


def sites(spec: DecoderSpec) -> dict[str, Site]:
    """Every linear layer of a decoder block the builder writes, by tag (the LM head is not one)."""
    s = spec
    return site_table(s.features.family, s.num_layers, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                      s.hidden_size, s.intermediate_size)


def entry_sites(entry: ModelEntry) -> dict[str, Site]:
    """:func:`sites` of a bundle's model, from its manifest entry.

    Raises:
        ExportError: the entry is not a native graph, or predates LoRA support (no ``intermediate_size``).
    """
    family = FAMILIES.get(entry.architecture)
    if family is None or entry.kv_layout.get("kind") != "shared_buffer":
        raise ExportError(f"the bundle's {entry.role} is a {entry.architecture} graph of kind "
                          f"{entry.kv_layout.get('kind')!r}; LoRA branches need a native cpu or gpu graph")
    if not entry.intermediate_size:
        raise ExportError(f"the bundle's {entry.role} was exported by an edgellm without LoRA support; re-export it "
                          "(with --lora NAME=PATH, or then add adapters with `edgellm add-lora`)")
    return site_table(family, entry.num_layers, entry.num_heads * entry.head_dim, entry.num_kv_heads * entry.head_dim,
                      entry.hidden_size, entry.intermediate_size)


def site_table(family: Family, num_layers: int, q: int, kv: int, hidden: int, inter: int) -> dict[str, Site]:
    """The sites of ``num_layers`` blocks of ``family`` with these widths (query, key/value, residual, MLP).

    A mixture of experts has its attention's sites only: its experts, router and shared expert
    take no branch (an adapter that changes them is refused by :func:`read_adapter`).
    """
    roles = ATTENTION_ROLES if family.moe else SITE_ROLES
    widths = {"q_proj": q, "k_proj": kv, "v_proj": kv, "qkv_proj": q + 2 * kv, "o_proj": hidden,
              "gate_proj": inter, "up_proj": inter, "gate_up_proj": 2 * inter, "down_proj": hidden}
    ins = {"qkv": hidden, "o": q, "gate_up": hidden, "down": inter}
    out: dict[str, Site] = {}
    for i in range(num_layers):
        names = block_names(i, family)
        for role in roles:
            mods, col = [], 0
            for w in [names[role]] if isinstance(names[role], str) else names[role]:
                module = w.removesuffix(".weight")
                width = widths[module.rsplit(".", 1)[1]]
                mods.append((module, col, col + width))
                col += width
            out[f"l{i}.{role}"] = Site(f"l{i}.{role}", ins[role], col, tuple(mods))
    return out


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from its folder, checked against a base.

    Attributes:
        name: the adapter's name in the bundle.
        path: its folder.
        rank: ``r`` of its config (modules may differ through ``rank_pattern``).
        alpha: ``lora_alpha``.
        rslora: scales by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        target_modules: the module names it changes (``q_proj``, ...), sorted.
        base_model: ``base_model_name_or_path`` of its config (informative only).
        arrays: per site tag, ``{tag}.a`` float32 ``(in, R)`` and ``{tag}.b`` float32 ``(R, out)``
            (scale folded into ``b``).
    """

    name: str
    path: Path
    rank: int
    alpha: float
    rslora: bool
    target_modules: tuple[str, ...]
    base_model: str | None
    arrays: dict[str, np.ndarray]

    @property
    def site_tags(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.arrays})

    def describe(self) -> dict[str, Any]:
        """Its manifest entry, less the file."""
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
                "target_modules": list(self.target_modules), "sites": len(self.site_tags),
                "source": {"name": self.path.name, "base_model_name_or_path": self.base_model}}

    def save(self, path: Path) -> None:
        """Write :attr:`arrays` as an ``.npz`` (no pickle: plain arrays only)."""
        path.unlink(missing_ok=True)  # a new file: never write through a hard link to another bundle's
        with open(path, "wb") as f:
            np.savez(f, **self.arrays)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}; allowed: 1-64 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit", param="lora")
    return name


def parse_lora_args(items: list[str] | tuple[str, ...] | dict | None) -> dict[str, Path]:
    """``["NAME=PATH", ...]`` (the CLI's form) or ``{NAME: PATH}`` -> ``{NAME: Path}``, names checked."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else [_split(x) for x in items]
    out: dict[str, Path] = {}
    for name, path in pairs:
        if check_name(name) in out:
            raise ConfigError(f"adapter name {name!r} given twice; each adapter needs its own name", param="lora")
        out[name] = Path(path).expanduser()
    return out


def _split(item: str) -> tuple[str, str]:
    name, sep, path = str(item).partition("=")
    if not sep or not path:
        raise ConfigError(f"lora={item!r}; allowed: NAME=PATH (a PEFT LoRA folder), e.g. pirate=./my-adapter",
                          param="lora")
    return name, path


def read_adapter(name: str, folder: Path, all_sites: dict[str, Site]) -> LoraAdapter:
    """Read a PEFT LoRA folder and check it against the base's sites (:func:`sites`, :func:`entry_sites`).

    Raises:
        ExportError: not a PEFT LoRA folder, a config field this exporter does not implement,
            a module the base has no site for, a layer past the base's, or a matrix whose shape
            is not the base's (an adapter of another base).
    """
    where = f"adapter {name!r} ({folder})"
    cfg = _read_config(folder, where)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ExportError(f"{where}: no adapter_model.safetensors (adapter_model.bin is not read: no pickle)")
    index = safetensors_index(files)
    pairs: dict[str, dict[str, str]] = {}
    for key in index:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ExportError(f"{where}: tensor {key!r} is not a LoRA A/B matrix (embedding LoRA, DoRA magnitudes "
                              "and saved modules are not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = key
    if not pairs:
        raise ExportError(f"{where}: its safetensors hold no LoRA matrices")
    by_module = {mod: site for site in all_sites.values() for mod, _, _ in site.modules}
    layers = len({tag.split(".")[0] for tag in all_sites})
    mlp = any(tag.endswith(".down") for tag in all_sites)
    rank, alpha, rslora = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora"))
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, int, int]]] = {}
    for module, ab in sorted(pairs.items()):
        site = by_module.get(module)
        if site is None:
            what = "the attention and MLP projections" if mlp else \
                "the attention projections (a mixture of experts' experts, router and shared expert take none)"
            raise ExportError(f"{where}: it changes {module!r}, which this base has no LoRA site for; allowed: "
                              f"{what} of layers 0-{layers - 1} "
                              f"({', '.join(sorted({m.rsplit('.', 1)[1] for m in by_module}))})")
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{where}: {module} has lora_{''.join(ab)} but not both A and B")
        a, b = safetensors_tensor(index[ab["A"]], ab["A"]), safetensors_tensor(index[ab["B"]], ab["B"])
        _, lo, hi = next(x for x in site.modules if x[0] == module)
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != site.in_dim or b.shape != (hi - lo, r):
            raise ExportError(f"{where}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; this base "
                              f"needs [r, {site.in_dim}] and [{hi - lo}, r]: an adapter trained on another base model")
        want_r = int(_pattern(cfg.get("rank_pattern"), module, rank))
        if r != want_r:
            raise ExportError(f"{where}: {module} has rank {r}, its adapter_config.json says {want_r}")
        a_alpha = float(_pattern(cfg.get("alpha_pattern"), module, alpha))
        scale = a_alpha / (r ** 0.5 if rslora else r)
        parts.setdefault(site.tag, []).append((a, b * np.float32(scale), lo, hi))
    arrays: dict[str, np.ndarray] = {}
    for tag, mods in parts.items():
        site, total = all_sites[tag], sum(a.shape[0] for a, _, _, _ in mods)
        a_cat = np.zeros((site.in_dim, total), np.float32)
        b_cat = np.zeros((total, site.out_dim), np.float32)
        k = 0
        for a, b, lo, hi in mods:
            a_cat[:, k:k + a.shape[0]] = a.T
            b_cat[k:k + a.shape[0], lo:hi] = b.T
            k += a.shape[0]
        arrays[f"{tag}.a"], arrays[f"{tag}.b"] = a_cat, b_cat
    targets = tuple(sorted({m.rsplit(".", 1)[1] for m in pairs}))
    return LoraAdapter(name, folder, rank, alpha, rslora, targets, cfg.get("base_model_name_or_path"), arrays)


def _read_config(folder: Path, where: str) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ExportError(f"{where}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{where}: adapter_config.json is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{where}: adapter_config.json is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{where}: peft_type {cfg.get('peft_type')!r}; allowed: LORA")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key) not in (None, False, [], {}, "", "none"):
            raise ExportError(f"{where}: {key}={cfg[key]!r}: {what}; not supported (export the merged model instead)")
    if cfg.get("bias", "none") != "none":
        raise ExportError(f"{where}: bias={cfg['bias']!r} trains biases beside the LoRA matrices; allowed: 'none'")
    for key in ("r", "lora_alpha"):
        if key in cfg and not (isinstance(cfg[key], (int, float)) and not isinstance(cfg[key], bool) and cfg[key] > 0):
            raise ExportError(f"{where}: {key}={cfg[key]!r}; expected a positive number")
    return cfg


def _pattern(patterns: Any, module: str, default: float) -> float:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the value of the first key matching the module's
    name or a dotted suffix of it (PEFT matches ``(.*\\.)?KEY$``), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


# ---------------------------------------------------------------------------------------- graphs
def add_branches(graph: Path, tags: list[str], all_sites: dict[str, Site], dtype: str = "float32") -> list[str]:
    """Give the graph at ``graph`` a LoRA branch on each site of ``tags`` it does not have yet.

    The builder names each linear layer's output ``<tag>.output``; it becomes ``<tag>.base`` and
    ``<tag>.output = <tag>.base + (x @ lora.<tag>.a) @ lora.<tag>.b``. Weights stay in their
    external data file (only the graph's structure is rewritten).

    Returns:
        The tags that got a branch now.

    Raises:
        ExportError: the graph has no ``<tag>.output`` (exported by an edgellm before LoRA support).
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    g = model.graph
    have = {i.name for i in g.input}
    producer = {o: n for n in g.node for o in n.output}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    added: dict[int, list] = {}
    new_tags = [t for t in tags if f"lora.{t}.a" not in have]
    for tag in new_tags:
        node = producer.get(f"{tag}.output")
        if node is None:
            raise ExportError(f"{graph}: no {tag}.output in the graph; it was exported by an edgellm without LoRA "
                              "support: re-export the bundle, then add the adapter")
        x = _linear_input(node, producer)
        base = f"{tag}.base"
        node.output[0] = base
        site = all_sites[tag]
        a, b = f"lora.{tag}.a", f"lora.{tag}.b"
        g.input.extend([helper.make_tensor_value_info(a, elem, [site.in_dim, f"{tag}.rank"]),
                        helper.make_tensor_value_info(b, elem, [f"{tag}.rank", site.out_dim])])
        added[id(node)] = [helper.make_node("MatMul", [x, a], [f"{tag}.lora_down"], name=f"{tag}.lora_down"),
                           helper.make_node("MatMul", [f"{tag}.lora_down", b], [f"{tag}.lora_up"], name=f"{tag}.lora_up"),
                           helper.make_node("Add", [base, f"{tag}.lora_up"], [f"{tag}.output"], name=f"{tag}.lora_add")]
    nodes = []
    for n in g.node:  # each branch right after its linear layer: the graph stays topologically sorted
        nodes.append(n)
        nodes.extend(added.get(id(n), []))
    del g.node[:]
    g.node.extend(nodes)
    tmp = graph.with_name(graph.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(graph)  # a new file: a hard link to the old graph (add_lora's copy) keeps the old one
    return new_tags


def _linear_input(node, producer: dict) -> str:
    """The input ``x`` of the linear layer ending in ``node``: back along first inputs (bias Add, the
    K-quant minimum's Sub, a Concat of weight groups) to the MatMul / MatMulNBits reading it."""
    while node.op_type not in ("MatMul", "MatMulNBits"):
        node = producer[node.input[0]]
    return node.input[0]



# ---------------------------------------------------------------------------------------- bundles
def site_order(tag: str) -> tuple[int, int]:
    layer, role = tag[1:].split(".", 1)
    return int(layer), SITE_ROLES.index(role)


def attach(tmp: Path, entry: dict[str, Any], adapters: list[LoraAdapter], all_sites: dict[str, Site],
           manifest_adapters: dict[str, Any], say, role: str = "target") -> None:
    """Give the ``role`` graph in the bundle folder ``tmp`` the branches ``adapters`` need and write their files.

    Updates ``entry`` (the model's manifest entry: ``lora``) and ``manifest_adapters`` (the
    manifest's ``adapters``: ``{name: {"target": file, "draft": file (a draft adapter), ...}}``) in place.
    """
    dtype = entry["kv_layout"]["dtype"]
    tags = sorted(set((entry.get("lora") or {}).get("sites", {})) | {t for a in adapters for t in a.site_tags},
                  key=site_order)
    new = add_branches(tmp / entry["graph"], tags, all_sites, dtype)
    if new:
        say(f"{role}: LoRA branches on {len(new)} linear layers ({len(tags)} in all)")
    entry["lora"] = {"sites": {t: [all_sites[t].in_dim, all_sites[t].out_dim] for t in tags}, "dtype": dtype}
    (tmp / "adapters").mkdir(exist_ok=True)
    for a in adapters:
        rel = f"adapters/{a.name}.npz" if role == "target" else f"adapters/{a.name}.{role}.npz"
        a.save(tmp / rel)
        if role == "target":
            manifest_adapters[a.name] = {"target": rel} | a.describe()
        else:
            manifest_adapters[a.name] = manifest_adapters[a.name] | {role: rel, f"{role}_lora": a.describe()}
        say(f"adapter {a.name} ({role}): rank {a.rank} on {', '.join(a.target_modules)} ({len(a.site_tags)} sites)")


def ort_values(adapter: LoraAdapter, dtype: str = "float32") -> dict[str, Any]:
    """The adapter's matrices as OrtValues (what a session binds), without writing them first."""
    from edgellm.lora import ort_values as to_ort

    return to_ort(adapter.arrays, dtype)
