"""Build an onnxruntime decoder graph for a Llama-family model, weight by weight.

The graph is what the runtime's KV cache expects (see ``edgellm/manifest.py``):

inputs
    ``input_ids`` int64 ``(1, S)`` - S new tokens (prompt chunk, one step, or a verify batch);
    ``num_logits`` int64 ``(1,)`` - logits are returned for the last ``num_logits`` positions;
    ``seqlens_k`` int32 ``(1,)`` - total tokens in the cache after this call, minus one;
    ``total_sequence_length`` int32 scalar - the same total;
    ``past_key_values.%d.key|value`` float32 ``(1, kv_heads, max_context, head_dim)``.
outputs
    ``logits`` float32 ``(1, num_logits, vocab)``; ``present.%d.key|value`` like the past.

Attention is onnxruntime's fused ``GroupQueryAttention`` with rotary embedding inside and the
past and present KV buffers shared: new keys are written at positions ``[P, P + S)`` of a
preallocated buffer, so rolling back is passing a smaller ``seqlens_k`` next time (O(1)).
Linear layers are ``MatMulNBits`` (int4/int8), or ``MatMul`` over fp32 / fp16-stored weights.
Weights stream to one external-data file as they are produced, so memory stays near one layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgellm.errors import ConfigError
from edgellm.export.graph import IR_VERSION, MS_DOMAIN, OPSET, GraphWriter, LinearLayers
from edgellm.export.quantize import quantize_blockwise
from edgellm.export.families import Experts, Rope, rope_tables
from edgellm.export.source import EMBED, FINAL_NORM, LM_HEAD, Source, block_names, expert_names
from edgellm.options import QUANTS

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class QuantConfig:
    """How one model's weights are stored.

    Attributes:
        quant: ``int4`` / ``int8`` (MatMulNBits, weight-only), ``fp16`` (weights stored fp16,
            computed fp32 on CPU), ``fp32``, or ``gguf``: a GGUF source's own quantized blocks
            kept exactly (see :mod:`edgellm.export.gguf_blocks`); weights without such blocks
            fall back to int8 with ``block_size``.
        block_size: MatMulNBits block size along the input dimension.
        symmetric: int quantization without zero points.
        accuracy_level: MatMulNBits compute type (4 = int8 activations, fastest on CPU;
            1 = fp32).
        lm_head_quant: storage of the output projection; ``None`` means the same as ``quant``.
        activations: ``fp32``, or ``fp16`` (``--target-device gpu``): activations, KV cache,
            norms, embedding and MatMulNBits scales in fp16; logits still come out fp32.
    """

    quant: str = "int4"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    lm_head_quant: str | None = None
    activations: str = "fp32"

    def __post_init__(self) -> None:
        for name, value in (("quant", self.quant), ("lm_head_quant", self.lm_head_quant or self.quant)):
            if value not in QUANTS:
                raise ConfigError(f"{name}={value!r} is not allowed; allowed: {', '.join(QUANTS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size}; allowed: a power of two >= 16 (32, 64, 128)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level={self.accuracy_level}; allowed 0-4")
        if self.activations not in ("fp32", "fp16"):
            raise ConfigError(f"activations={self.activations!r}; allowed: fp32, fp16")
        if self.activations == "fp16" and {"fp32", "gguf"} & {self.quant, self.lm_head_quant or self.quant}:
            raise ConfigError(f"quant={self.quant!r} with fp16 activations (target_device='gpu'); "
                              "allowed there: int4, int8, fp16")

    def to_dict(self) -> dict:
        return {
            "quant": self.quant,
            # any MatMulNBits weight, the LM head's included, has this block (the runtime pads passes by it)
            "block_size": self.block_size if {self.quant, self.lm_head_quant} & {"int4", "int8", "gguf"} else None,
            "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level,
            "lm_head_quant": self.lm_head_quant or self.quant,
            "activations": self.activations,
        }


def io_names(num_layers: int) -> dict:
    """The graph's IO names, as recorded in the manifest."""
    return {
        "input_ids": "input_ids",
        "num_logits": "num_logits",
        "seqlens_k": "seqlens_k",
        "total_sequence_length": "total_sequence_length",
        "past_key": "past_key_values.%d.key",
        "past_value": "past_key_values.%d.value",
        "present_key": "present.%d.key",
        "present_value": "present.%d.value",
        "logits": "logits",
        "num_layers": num_layers,
    }


def routed_experts_reason(q: QuantConfig, activation: str, hidden: int, experts: Experts) -> str | None:
    """Why a mixture of experts stored as ``q`` computes every expert per row instead of only
    its own (onnxruntime's ``QMoE``: int4 / int8 blocks with int8 activations, SiLU-gated,
    widths in whole blocks; a GGUF file's experts re-quantized to int8), or ``None`` when its
    experts are routed."""
    if q.quant not in ("int4", "int8", "gguf"):  # gguf: QMoE takes no GGUF blocks, the experts become int8
        return f"quant {q.quant!r} (routed experts take int4 or int8)"
    if q.activations != "fp32" or q.accuracy_level != 4:
        return "fp16 activations" if q.activations != "fp32" else f"accuracy_level {q.accuracy_level} (routed: 4)"
    if activation != "silu":
        return f"the {activation} activation (routed experts are SiLU-gated)"
    for name, width in (("hidden_size", hidden), ("expert width", experts.intermediate_size)):
        if width % q.block_size:
            return f"{name} {width} is not a multiple of block_size {q.block_size}"
    return None


class DecoderBuilder(LinearLayers):
    """Turns a :class:`Source` into an ONNX decoder graph (see module docstring)."""

    def __init__(self, source: Source, quant: QuantConfig, max_context: int,
                 progress: Callable[[str], None] | None = None, logits_tokens: np.ndarray | None = None) -> None:
        """``logits_tokens``: int ``(n,)`` ascending token ids whose LM head rows are kept (column j of
        the logits is token ``logits_tokens[j]``; see :mod:`edgellm.export.draft_vocab`), or all."""
        super().__init__(source, quant, progress)
        self.logits_tokens = logits_tokens
        self.max_context = max_context
        self.routed_layers = 0  # mixture-of-experts layers whose experts are routed (QMoE)
        self.experts: str | None = None  # a mixture of experts: "routed" or "every expert per row: <why>"
        experts = self.features.experts
        if experts is not None:  # the manifest's quantization.experts
            why = routed_experts_reason(self.q, self.features.activation, self.spec.hidden_size, experts)
            self.experts = "routed" if why is None else f"every expert per row: {why}"

    # ------------------------------------------------------------------ graph
    def build(self, out_dir: Path, model_name: str = "model.onnx") -> Path:
        """Write ``model_name`` and ``model_name + '.data'`` into ``out_dir``. Returns the graph path."""
        import onnx
        from onnx import TensorProto, helper

        kv_type = self._act_type
        s = self.spec
        g = GraphWriter(out_dir / (model_name + ".data"))
        kv_shape = ["batch", s.num_kv_heads, self.max_context, s.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("num_logits", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        width = s.vocab_size if self.logits_tokens is None else len(self.logits_tokens)
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "num_logits", width])]
        try:
            ropes = self._rope_caches(g)
            x = self._embedding(g)
            resid = None
            for i in range(s.num_layers):
                self.progress(f"layer {i + 1}/{s.num_layers}")
                for kind in ("key", "value"):
                    inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_type, kv_shape))
                    outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_type, kv_shape))
                x, resid = self._layer(g, i, x, resid, ropes)
            if self.experts is not None:
                self.progress(f"experts routed in {self.routed_layers} layers" if self.experts == "routed" else
                              f"{self.experts} (the cost of a dense model of every expert's size)")
            self.progress("lm_head")
            normed = g.node("SkipSimplifiedLayerNormalization",
                            [x, resid, self._norm_weight(g, FINAL_NORM, "final_norm")],
                            n_out=1, domain=MS_DOMAIN, epsilon=s.rms_norm_eps)[0]
            (neg,) = g.node("Neg", ["num_logits"])
            (last,) = g.node("Slice", [normed, neg, g.const("int64_max", np.array([2**62], np.int64)),
                                       g.const("axis_1", np.array([1], np.int64))])
            head = LM_HEAD if self.src.has(LM_HEAD) else EMBED
            logits = self._linear(g, last, [head], self.q.lm_head_quant or self.q.quant, "lm_head",
                                  self.logits_tokens)
            if self.act != np.float32:  # the sampler reads fp32 logits whatever the graph computes in
                (logits,) = g.node("Cast", [logits], to=TensorProto.FLOAT)
            if self.features.logits_scaling != 1.0:  # Granite
                (logits,) = g.node("Div", [logits, g.const("logits_scaling", np.array(self.features.logits_scaling,
                                                                                      np.float32))])
            if self.features.final_softcap:  # cap * tanh(logits / cap), Gemma 2
                cap = g.const("final_softcap", np.array(self.features.final_softcap, np.float32))
                (logits,) = g.node("Div", [logits, cap])
                (logits,) = g.node("Tanh", [logits])
                (logits,) = g.node("Mul", [logits, cap])
            g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        finally:
            g.close()
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="edgellm", ir_version=IR_VERSION)
        path = out_dir / model_name
        onnx.save(model, str(path))
        return path

    def _rope_caches(self, g: GraphWriter) -> dict[Rope, tuple[str, str]]:
        """cos/sin caches ``(max_context, rotary_dim / 2)`` per kind of rotary layer.

        longrope uses its long factors past ``original_max_position_embeddings``. transformers
        switches by the length of each forward call (a key cached by a short call keeps its
        short factors); here the switch is by position — row ``p`` rotates with the long
        factors when ``p >= original_max_position_embeddings`` — which is what transformers
        computes when it decodes token by token, and does not depend on how the text is cut
        into passes: prompt caching, speculative verify passes and batching stay exact.
        """
        f = self.features
        caches = {}
        for j, rope in enumerate(r for r in (f.rope, f.local_rope) if r is not None):
            tables = rope_tables(rope, self.max_context)
            switch = rope.switch_length()
            if switch is not None and self.max_context > switch:
                longer = rope_tables(rope, self.max_context, long=True)
                tables = [np.concatenate([sh[:switch], lo[switch:]]) for sh, lo in zip(tables, longer)]
            caches[rope] = tuple(g.const(f"{k}_cache{'_local' if j else ''}", t.astype(self.act))
                                 for k, t in zip(("cos", "sin"), tables))
        return caches

    def _embedding(self, g: GraphWriter) -> str:
        table = self.src.tensor(EMBED)
        if self.q.quant == "fp32":
            (x,) = g.node("Gather", [g.const("embed_tokens", table), "input_ids"])
        else:
            (x,) = g.node("Gather", [g.const("embed_tokens", table.astype(np.float16)), "input_ids"])
            if self.act != np.float16:
                (x,) = g.node("Cast", [x], to=self.TensorProto.FLOAT)
        scale = self.spec.hidden_size ** 0.5 if self.features.family.embed_scale else 1.0  # Gemma: sqrt(hidden)
        scale *= self.features.embedding_multiplier  # Granite
        if scale != 1.0:
            (x,) = g.node("Mul", [x, g.const("embed_scale", np.array(scale, self.act))])
        return x

    def _norm_weight(self, g: GraphWriter, name: str, tag: str) -> str:
        """An RMSNorm's multiplier: ``offset + weight`` (Gemma's offset 1 is added in fp32, as transformers does)."""
        w = self.src.tensor(name).astype(np.float32) + np.float32(self.features.family.norm_offset)
        return g.const(tag, w.astype(self.act))

    def _layer(self, g: GraphWriter, i: int, x: str, resid: str | None, ropes: dict) -> tuple[str, str]:
        """One decoder block. ``x`` is the previous block's output delta (or the embedding), ``resid``
        the residual stream before it; returns this block's delta and the stream before it."""
        n, ms, eps = block_names(i, self.features.family), MS_DOMAIN, self.spec.rms_norm_eps
        if "input_norm" not in n:  # OLMo-2: the attention reads the residual stream itself
            h = resid = x if resid is None else g.node("Add", [x, resid])[0]
        elif resid is None:  # first block: plain RMSNorm of the embedding
            (h,) = g.node("SimplifiedLayerNormalization", [x, self._norm_weight(g, n["input_norm"], f"l{i}.input_norm")],
                          axis=-1, epsilon=eps)
            resid = x
        else:
            h, _, _, resid = g.node("SkipSimplifiedLayerNormalization",
                                    [x, resid, self._norm_weight(g, n["input_norm"], f"l{i}.input_norm")],
                                    n_out=4, domain=ms, epsilon=eps)
        o = self._linear(g, self._attention(g, i, h, n, ropes), [n["o"]], self.q.quant, f"l{i}.o")
        o = self._branch_output(g, o, n.get("attn_out_norm"), f"l{i}.attn_out")
        if "mlp_norm" in n:
            h2, _, _, resid = g.node("SkipSimplifiedLayerNormalization",
                                     [o, resid, self._norm_weight(g, n["mlp_norm"], f"l{i}.mlp_norm")],
                                     n_out=4, domain=ms, epsilon=eps)
        else:
            h2 = resid = g.node("Add", [o, resid])[0]
        experts = self.features.experts
        if experts is not None and experts.sparse[i]:
            y = self._experts(g, i, h2, experts)
        else:
            act = self._gated(g, self._linear(g, h2, n["gate_up"], self.q.quant, f"l{i}.gate_up"),
                              self.spec.intermediate_size, f"l{i}.gu_split")
            y = self._linear(g, act, [n["down"]], self.q.quant, f"l{i}.down")
        return self._branch_output(g, y, n.get("mlp_out_norm"), f"l{i}.mlp_out"), resid

    def _gated(self, g: GraphWriter, gu: str, width: int, tag: str) -> str:
        """``act(gate) * up`` of a gated MLP whose gate and up projections come side by side in ``gu``."""
        gate, up = g.node("Split", [gu, g.const(tag, np.array([width] * 2, np.int64))], n_out=2, axis=-1)
        return g.node("Mul", [self._activation(g, gate), up])[0]

    def _experts(self, g: GraphWriter, i: int, h: str, experts: Experts) -> str:
        """Block ``i``'s mixture-of-experts MLP of ``h`` ``(B, S, hidden)``; returns ``(B, S, hidden)``.

        The router stays fp32 (a rounded router would pick other experts): ``softmax``, the
        ``top_k`` largest kept (renormalized when the family does), each row's weight per expert
        ``(B, S, count)``, 0 for the experts it does not pick. Int4 and int8 experts are then
        *routed* (:meth:`_routed_experts`: a row reads only its own experts' weights); other
        storage, or what onnxruntime's expert kernel cannot take (:func:`routed_experts_reason`),
        computes every expert (:meth:`_every_expert`). The shared expert, where there is one, is a
        dense MLP added to either, weighted by ``sigmoid(x @ shared_gate.T)`` (Qwen2-MoE) or 1
        (Granite).
        """
        n = expert_names(i, self.features.family, experts)
        (logits,) = g.node("MatMul", [h, g.const(f"l{i}.router", self.src.tensor(n["router"]).T.astype(self.act))])
        (probs,) = g.node("Softmax", [logits], axis=-1)
        top, picked = g.node("TopK", [probs, g.const("top_k", np.array([experts.top_k], np.int64))], n_out=2, axis=-1)
        if experts.normalize:
            (total,) = g.node("ReduceSum", [top, g.const("last_axis", np.array([-1], np.int64))], keepdims=1)
            (top,) = g.node("Div", [top, total])
        shared = experts.shared_intermediate_size
        if self.experts != "routed":
            return self._every_expert(g, i, h, n, experts, probs, top, picked)
        self.routed_layers += 1
        y = self._routed_experts(g, i, h, n, experts, top, picked)
        if not shared:
            return y
        shared_gate_up = [n["gate_up"][experts.count], n["gate_up"][-1]]  # after the routed gates / ups
        gate_up = self._linear(g, h, shared_gate_up, self.q.quant, f"l{i}.shared_gate_up")
        act = self._gated(g, gate_up, shared, f"l{i}.shared_gu_split")
        y_shared = self._linear(g, act, [n["down"][-1]], self.q.quant, f"l{i}.shared_down")
        if "shared_gate" in n:  # Qwen2-MoE: gated by a sigmoid; Granite: always added, weight 1
            gate_w = self.src.tensor(n["shared_gate"]).T.astype(self.act)
            (gate,) = g.node("MatMul", [h, g.const(f"l{i}.shared_gate", gate_w)])
            (y_shared,) = g.node("Mul", [y_shared, g.node("Sigmoid", [gate])[0]])
        return g.node("Add", [y, y_shared])[0]

    def _every_expert(self, g: GraphWriter, i: int, h: str, n: dict, experts: Experts, probs: str, top: str,
                      picked: str) -> str:
        """Every expert (and the shared one) on every row, each weighted by its kept probability
        ``top`` (``(B, S, top_k)``, of experts ``picked``), 0 for the others: a row's output is
        transformers' sum over its ``top_k`` experts (adding exact zeros changes nothing) and
        does not depend on the other rows of the pass. The price: a step reads every expert's
        weights, the bytes of a dense model of the same total size."""
        (zeros,) = g.node("Sub", [probs, probs])
        (weights,) = g.node("ScatterElements", [zeros, picked, top], axis=-1)  # (B, S, count)
        widths = [experts.intermediate_size] * experts.count + [experts.shared_intermediate_size] * (
            experts.shared_intermediate_size > 0)
        if "shared_gate" in n:  # Qwen2-MoE: a shared expert gated by a sigmoid
            (gate,) = g.node("MatMul", [h, g.const(f"l{i}.shared_gate", self.src.tensor(n["shared_gate"]).T.astype(self.act))])
            (weights,) = g.node("Concat", [weights, g.node("Sigmoid", [gate])[0]], axis=-1)
        elif experts.shared_intermediate_size:  # Granite: a shared expert always added, weight 1
            (zero,) = g.node("Gather", [zeros, g.const("first_expert", np.array([0], np.int64))], axis=-1)
            (one,) = g.node("Add", [zero, g.const("one", np.array(1.0, self.act))])
            (weights,) = g.node("Concat", [weights, one], axis=-1)
        column_expert = np.repeat(np.arange(len(widths), dtype=np.int64), widths)
        (per_column,) = g.node("Gather", [weights, g.const(f"l{i}.column_expert", column_expert)], axis=-1)
        act = self._gated(g, self._linear(g, h, n["gate_up"], self.q.quant, f"l{i}.experts_gate_up"),
                          int(column_expert.size), f"l{i}.gu_split")
        (act,) = g.node("Mul", [act, per_column])
        return self._linear(g, act, n["down"], self.q.quant, f"l{i}.experts_down", along_input=True)

    def _routed_experts(self, g: GraphWriter, i: int, h: str, n: dict, experts: Experts, top: str,
                        picked: str) -> str:
        """The routed experts of ``h`` ``(B, S, hidden)`` through onnxruntime's ``QMoE`` kernel,
        which runs each expert on the rows that picked it: a step reads ``top_k`` experts'
        weights, not ``count``. Returns ``(B, S, hidden)``.

        Bit for bit, a row's output must not depend on the other rows of the pass. ``QMoE`` alone
        does not give that: it adds a row's experts up in an order set by how many rows each
        expert got. So every row goes in once per top-k slot (``top_k * rows`` rows, slot-major),
        each copy routed to its slot's expert alone (a router row that holds only that expert's
        weight): each output row is one expert's weighted output, and the slots are summed in
        rank order. Where the int8 kernels round an odd row of a batch apart (blocks of 64 and
        more, see :func:`edgellm.runtimes.graphs.matmul_row_multiple`), all of it goes in twice,
        so that every expert's batch is even.
        """
        from edgellm.runtimes.graphs import matmul_row_multiple

        e, k, width, hidden = experts.count, experts.top_k, experts.intermediate_size, self.spec.hidden_size
        bits = 4 if self.q.quant == "int4" else 8
        if self.q.quant == "gguf":  # QMoE cannot hold GGUF blocks (nor K-quants' minimums)
            self.requantized.append(f"model.layers.{i}.mlp.experts (all {e})")
        fc1, fc2, ups = [], [], e + (experts.shared_intermediate_size > 0)  # gate_up: gates, then ups
        for j in range(e):  # gate and up rows interleaved (swiglu_fusion=1), then the down projection
            gate, up = self.src.tensor(n["gate_up"][j]), self.src.tensor(n["gate_up"][ups + j])
            fc1.append(self._expert_blocks(np.stack([gate, up], axis=1).reshape(2 * width, hidden), bits))
            fc2.append(self._expert_blocks(self.src.tensor(n["down"][j]), bits))
        w = {}
        for tag, packed in (("fc1", fc1), ("fc2", fc2)):
            for part, arrays in zip(("qweight", "scales", "zero_points"), zip(*packed)):
                w[tag, part] = g.const(f"l{i}.experts_{tag}.{part}", np.stack(arrays))
        del fc1, fc2
        copies = matmul_row_multiple(self.q.to_dict())
        # each row once per slot, slot-major: (k * rows, hidden), each routed to its slot's expert only
        # by a router row that holds that expert's weight and zeros: (k * rows, count)
        (hot,) = g.node("OneHot", [picked, g.const("experts_depth", np.array(e, np.int64)),
                                   g.const("one_hot_values", np.array([0, 1], self.act))], axis=-1)
        (routers,) = g.node("Mul", [hot, g.node("Unsqueeze", [top, g.const("last_axis", np.array([-1], np.int64))])[0]])
        (routers,) = g.node("Reshape", [routers, g.const("rows_by_slots_by_experts", np.array([-1, k, e], np.int64))])
        (routers,) = g.node("Transpose", [routers], perm=[1, 0, 2])
        (routers,) = g.node("Reshape", [routers, g.const("rows_by_experts", np.array([-1, e], np.int64))])
        (rows,) = g.node("Reshape", [h, g.const("rows_by_hidden", np.array([-1, hidden], np.int64))])
        if k * copies > 1:
            (rows,) = g.node("Concat", [rows] * (k * copies), axis=0)
        if copies > 1:
            (routers,) = g.node("Concat", [routers] * copies, axis=0)
        (y,) = g.node("QMoE", [rows, routers, w["fc1", "qweight"], w["fc1", "scales"], "", w["fc2", "qweight"],
                               w["fc2", "scales"], "", "", "", "", w["fc1", "zero_points"], w["fc2", "zero_points"], "",
                               routers],
                      domain=MS_DOMAIN, k=1, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                      activation_beta=0.0, expert_weight_bits=bits, block_size=self.q.block_size,
                      normalize_routing_weights=0, accuracy_level=self.q.accuracy_level, weights_prepacked=0)
        if k * copies > 1:  # the slots' outputs, summed in rank order (the copies' dropped)
            ys = g.node("Split", [y], n_out=k * copies, axis=0)[:k]
            (y,) = g.node("Sum", ys) if k > 1 else ys
        return g.node("Reshape", [y, g.node("Shape", [h])[0]])[0]

    def _expert_blocks(self, w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One expert matrix ``w`` ``(N, K)`` as ``QMoE`` reads it: codes ``(N, K * bits / 8)``,
        scales ``(N, K / block)`` and zero points ``(N, ceil(K / block * bits / 8))`` (the
        symmetric level spelled out where there are none)."""
        p = quantize_blockwise(w, bits, self.q.block_size, self.q.symmetric)
        nb = p.K // p.block_size
        zp = p.zero_points
        if zp is None:
            zp = np.full(p.N * -(-nb * bits // 8), 0x88 if bits == 4 else 0x80, np.uint8)
        return p.data.reshape(p.N, -1), p.scales.reshape(p.N, nb).astype(self.act), zp.reshape(p.N, -1)

    def _branch_output(self, g: GraphWriter, y: str, norm: str | None, tag: str) -> str:
        """An attention or MLP output before its residual add: its own norm (Gemma 2/3, OLMo-2)
        and Granite's ``residual_multiplier``."""
        if norm:
            (y,) = g.node("SimplifiedLayerNormalization", [y, self._norm_weight(g, norm, tag + "_norm")], axis=-1,
                          epsilon=self.spec.rms_norm_eps)
        if self.features.residual_multiplier != 1.0:
            (y,) = g.node("Mul", [y, g.const(tag + "_multiplier", np.array(self.features.residual_multiplier, self.act))])
        return y

    def _attention(self, g: GraphWriter, i: int, h: str, n: dict, ropes: dict) -> str:
        """Grouped-query attention of block ``i`` over the shared KV buffer; returns ``(B, S, heads * head_dim)``."""
        s, f = self.spec, self.features
        qkv = self._linear(g, h, n["qkv"], self.q.quant, f"l{i}.qkv")
        q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = g.node("Split", [qkv, g.const(f"l{i}.qkv_split", np.array([q_dim, kv_dim, kv_dim], np.int64))],
                         n_out=3, axis=-1)
        if "q_norm" in n:  # RMSNorm before rotary: per head (Qwen3, Gemma 3) or over the projection (OLMo-2)
            per_head = f.family.qk_norm == "head"
            q = self._qk_norm(g, q, n["q_norm"], s.num_heads if per_head else 1, f"l{i}.q_norm")
            k = self._qk_norm(g, k, n["k_norm"], s.num_kv_heads if per_head else 1, f"l{i}.k_norm")
        window = f.windows[i]
        rope = f.local_rope if window > 0 and f.local_rope is not None else f.rope
        cos, sin = ropes[rope]
        attn = g.name("gqa")
        extra = {"softcap": f.attn_softcap} if f.attn_softcap else {}
        g.nodes.append(self.helper_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
             "total_sequence_length", cos, sin],
            [attn, f"present.{i}.key", f"present.{i}.value"],
            num_heads=s.num_heads, kv_num_heads=s.num_kv_heads, do_rotary=int(f.rotary[i]),
            rotary_interleaved=0, scale=float(f.attention_scale), local_window_size=int(window), **extra,
        ))
        return attn

    def _qk_norm(self, g: GraphWriter, x: str, name: str, heads: int, tag: str) -> str:
        """RMSNorm of ``x`` ``(B, S, width)`` over each of ``heads`` equal slices (1: the whole width)."""
        if heads == 1:
            return g.node("SimplifiedLayerNormalization", [x, self._norm_weight(g, name, tag)], axis=-1,
                          epsilon=self.spec.rms_norm_eps)[0]
        (xh,) = g.node("Reshape", [x, g.const(tag + ".heads", np.array([0, 0, heads, self.spec.head_dim], np.int64))])
        (y,) = g.node("SimplifiedLayerNormalization", [xh, self._norm_weight(g, name, tag)], axis=-1,
                      epsilon=self.spec.rms_norm_eps)
        (y,) = g.node("Reshape", [y, g.const(tag + ".flat", np.array([0, 0, heads * self.spec.head_dim], np.int64))])
        return y

    def _activation(self, g: GraphWriter, x: str) -> str:
        """The MLP's gate activation: SiLU, tanh-approximated GELU (FastGelu) or exact GELU."""
        kind = self.features.activation
        if kind == "silu":
            (sig,) = g.node("Sigmoid", [x])
            return g.node("Mul", [x, sig])[0]
        return g.node("FastGelu" if kind == "gelu_tanh" else "Gelu", [x], domain=MS_DOMAIN)[0]

    @staticmethod
    def helper_node(op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper

        return helper.make_node(op, inputs, outputs, domain=MS_DOMAIN, **attrs)
