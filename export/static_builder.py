"""Static-shape decoder graphs of standard ONNX operators, for NPUs (``--target-device npu``).

NPU execution providers (QNN's HTP backend, ...) compile fixed shapes and take the standard
operator set, not onnxruntime's contrib ops. This graph processes exactly ``S`` tokens
(``window``) per call against a KV cache of exactly ``C`` positions that the *runtime* keeps and
writes by position (rollback = move the position); nothing in it has a dynamic dimension::

    inputs   input_ids [1, S] int64, cos/sin [1, S, D/2] (rotary angles of the S positions),
             write_positions [1, 1, S, 1] int64 (the cache slots of the S tokens: P .. P+S-1),
             attention_mask [1, 1, G*S, L] (1 = masked, 0 = attended; G = heads per KV head),
             past_key_values.%d.key/value [1, KVH, L, D]
    outputs  logits [1, S, V], present.%d.key/value [1, KVH, S, D] (the S new entries only)

L = C + W slots (W: the window graph's window, so padding rows past the context still have a
slot). The new keys and values are written into the cache by position inside the graph
(ScatterElements) before attention, so a token attends the same slots in the same order whether
the tokens before it came in its own window (verification) or earlier ones (decoding alone):
its logits are then the same bits both ways, which exact speculation needs (a concatenation of
cache and window, as before, summed in a different order and, in QDQ graphs, flipped roundings).

Attention is written out: RMSNorm as ReduceMean/Sqrt/Div, rotary as Split/Mul/Sub/Add/Concat,
grouped-query attention by folding each KV head's G query heads into rows (no Expand), scores
over the concatenation of the cache and the new keys, Softmax, MatMul.

Each layer adds ``attention_mask * l<i>.mask_value`` to its scores. The value must put a masked
key's score far below every real score of the row, whatever the model's scale: Qwen2.5-1.5B's
first layer scores range over [-2010, 12863] (an empty, all-zero cache slot scores 0 there), its
middle layers over about [-30, 30]. fp32 graphs use -30000 (exp() of the gap is 0; still finite
in the fp16 arithmetic NPUs use, where 0 * -inf would be NaN); QDQ graphs, whose scores share one
uint16 range per layer, get a per-layer value fitted to the calibrated scores
(:func:`edgellm.export.qdq.prepare_for_qdq`). Weights are fp32 MatMul initializers;
:mod:`edgellm.export.qdq` turns the graph into its QDQ variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.export.builder import QuantConfig
from edgellm.export.graph import IR_VERSION, GraphWriter, LinearLayers
from edgellm.export.source import EMBED, FINAL_NORM, LM_HEAD, Source, layer_names

MASK_VALUE = -30000.0
# opset 21: 16-bit QuantizeLinear (the QDQ variant) without an opset conversion, which would
# serialize the whole model in memory (impossible past 2 GB)
STATIC_OPSET = 21


def static_io_names(num_layers: int) -> dict:
    return {"input_ids": "input_ids", "cos": "cos", "sin": "sin", "attention_mask": "attention_mask",
            "write_positions": "write_positions",
            "past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value",
            "present_key": "present.%d.key", "present_value": "present.%d.value", "logits": "logits",
            "num_layers": num_layers}


class StaticDecoderBuilder(LinearLayers):
    """Writes the static, standard-operator graph above (a sibling of :class:`~edgellm.export.builder.DecoderBuilder`)."""

    def __init__(self, source: Source, max_context: int, window: int, progress=None,
                 cache_length: int | None = None) -> None:
        super().__init__(source, QuantConfig("fp32"), progress)
        self.max_context = max_context
        self.window = window
        self.cache_length = cache_length or max_context + window  # L above

    def build(self, out_dir: Path, model_name: str = "model.onnx") -> Path:
        import onnx
        from onnx import TensorProto, helper

        self.TensorProto = TensorProto
        s, S, L = self.spec, self.window, self.cache_length
        G = s.num_heads // s.num_kv_heads
        f32 = TensorProto.FLOAT
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, S]),
                  helper.make_tensor_value_info("cos", f32, [1, S, s.head_dim // 2]),
                  helper.make_tensor_value_info("sin", f32, [1, S, s.head_dim // 2]),
                  helper.make_tensor_value_info("write_positions", TensorProto.INT64, [1, 1, S, 1]),
                  helper.make_tensor_value_info("attention_mask", f32, [1, 1, G * S, L])]
        outputs = [helper.make_tensor_value_info("logits", f32, [1, S, s.vocab_size])]
        g = GraphWriter(out_dir / (model_name + ".data"))
        try:
            (x,) = g.node("Gather", [g.const("embed_tokens", self.src.tensor(EMBED)), "input_ids"])
            axis1 = g.const("axis_1_i64", np.array([1], np.int64))
            self._last_axis = g.const("axis_last_i64", np.array([-1], np.int64))
            self._cos, self._sin = g.node("Unsqueeze", ["cos", axis1])[0], g.node("Unsqueeze", ["sin", axis1])[0]
            half = s.head_dim // 2
            self._rope_split = g.const("rope_split", np.array([half, half], np.int64))
            kv_shape = g.const("kv_new_shape", np.array([1, s.num_kv_heads, S, s.head_dim], np.int64))
            (self._slots,) = g.node("Expand", ["write_positions", kv_shape])  # [1, KVH, S, D]
            for i in range(s.num_layers):
                self.progress(f"layer {i + 1}/{s.num_layers}")
                for kind in ("key", "value"):
                    inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32,
                                                                [1, s.num_kv_heads, L, s.head_dim]))
                    outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32,
                                                                 [1, s.num_kv_heads, S, s.head_dim]))
                x = self._static_layer(g, i, x)
            normed = self._rms_norm(g, x, self.src.tensor(FINAL_NORM), "final_norm")
            head = LM_HEAD if self.src.has(LM_HEAD) else EMBED
            logits = self._linear(g, normed, [head], "fp32", "lm_head")
            g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        finally:
            g.close()
        graph = helper.make_graph(g.nodes, "static_decoder", inputs, outputs, g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", STATIC_OPSET)], producer_name="edgellm",
                                 ir_version=IR_VERSION)
        path = out_dir / model_name
        onnx.save(model, str(path))
        return path

    # ------------------------------------------------------------------ pieces
    def _rms_norm(self, g: GraphWriter, x: str, weight: np.ndarray, tag: str) -> str:
        """RMSNorm of rows scaled by their largest magnitude first: an NPU may compute in fp16,
        where the squares of the residual stream's large activations (thousands, in Qwen2.5)
        overflow. ``x / sqrt(mean(x^2) + eps) = u / sqrt(mean(u^2) + eps / m^2)``, ``u = x / m``."""
        (m,) = g.node("ReduceMax", [g.node("Abs", [x])[0], self._last_axis], keepdims=1)
        (m,) = g.node("Add", [m, g.const(tag + ".tiny", np.array(1e-6, np.float32))])
        (u,) = g.node("Div", [x, m])
        (mean,) = g.node("ReduceMean", [g.node("Mul", [u, u])[0], self._last_axis], keepdims=1)
        (eps,) = g.node("Div", [g.const(tag + ".eps", np.array(self.spec.rms_norm_eps, np.float32)),
                                g.node("Mul", [m, m])[0]])
        (rms,) = g.node("Sqrt", [g.node("Add", [mean, eps])[0]])
        (y,) = g.node("Div", [u, rms])
        (y,) = g.node("Mul", [y, g.const(tag + ".weight", weight.astype(np.float32))])
        return y

    def _heads(self, g: GraphWriter, x: str, heads: int, tag: str) -> str:
        """``[1, S, heads*D]`` -> ``[1, heads, S, D]``."""
        (y,) = g.node("Reshape", [x, g.const(tag + ".shape", np.array([1, self.window, heads, self.spec.head_dim],
                                                                       np.int64))])
        (y,) = g.node("Transpose", [y], perm=[0, 2, 1, 3])
        return y

    def _rotary(self, g: GraphWriter, x: str) -> str:
        """rotate_half rotary on ``[1, heads, S, D]`` with cos/sin ``[1, S, D/2]`` inputs."""
        x1, x2 = g.node("Split", [x, self._rope_split], n_out=2, axis=-1)
        c, sn = self._cos, self._sin
        a, b = g.node("Mul", [x1, c])[0], g.node("Mul", [x2, sn])[0]
        first = g.node("Sub", [a, b])[0]
        a, b = g.node("Mul", [x2, c])[0], g.node("Mul", [x1, sn])[0]
        second = g.node("Add", [a, b])[0]
        return g.node("Concat", [first, second], axis=-1)[0]

    def _static_layer(self, g: GraphWriter, i: int, x: str) -> str:
        s, n, S = self.spec, layer_names(i), self.window
        G, D, kvh = s.num_heads // s.num_kv_heads, s.head_dim, s.num_kv_heads
        h = self._rms_norm(g, x, self.src.tensor(n["input_norm"]), f"l{i}.input_norm")
        q = self._rotary(g, self._heads(g, self._linear(g, h, [n["q"]], "fp32", f"l{i}.q"), s.num_heads, f"l{i}.q"))
        k = self._rotary(g, self._heads(g, self._linear(g, h, [n["k"]], "fp32", f"l{i}.k"), kvh, f"l{i}.k"))
        v = self._heads(g, self._linear(g, h, [n["v"]], "fp32", f"l{i}.v"), kvh, f"l{i}.v")
        g.nodes.append(self.helper_plain("Identity", [k], [f"present.{i}.key"]))
        g.nodes.append(self.helper_plain("Identity", [v], [f"present.{i}.value"]))
        # written into the cache by position: [1, KVH, L, D]
        (k_all,) = g.node("ScatterElements", [f"past_key_values.{i}.key", self._slots, k], axis=2)
        (v_all,) = g.node("ScatterElements", [f"past_key_values.{i}.value", self._slots, v], axis=2)
        # the G query heads of each KV head become rows: [1, H, S, D] -> [1, KVH, G*S, D]
        (qg,) = g.node("Reshape", [q, g.const(f"l{i}.qg_shape", np.array([1, kvh, G * S, D], np.int64))])
        (kt,) = g.node("Transpose", [k_all], perm=[0, 1, 3, 2])
        (scores,) = g.node("MatMul", [qg, kt])
        (scores,) = g.node("Mul", [scores, g.const(f"l{i}.scale", np.array(1.0 / np.sqrt(D), np.float32))])
        (bias,) = g.node("Mul", ["attention_mask", g.const(f"l{i}.mask_value", np.array(MASK_VALUE, np.float32))])
        (scores,) = g.node("Add", [scores, bias])
        (p,) = g.node("Softmax", [scores], axis=-1)
        (o,) = g.node("MatMul", [p, v_all])  # [1, KVH, G*S, D]
        (o,) = g.node("Reshape", [o, g.const(f"l{i}.o_heads", np.array([1, s.num_heads, S, D], np.int64))])
        (o,) = g.node("Transpose", [o], perm=[0, 2, 1, 3])
        (o,) = g.node("Reshape", [o, g.const(f"l{i}.o_shape", np.array([1, S, s.num_heads * D], np.int64))])
        (x2,) = g.node("Add", [x, self._linear(g, o, [n["o"]], "fp32", f"l{i}.o")])
        h2 = self._rms_norm(g, x2, self.src.tensor(n["post_norm"]), f"l{i}.post_norm")
        gate = self._linear(g, h2, [n["gate"]], "fp32", f"l{i}.gate")
        up = self._linear(g, h2, [n["up"]], "fp32", f"l{i}.up")
        (sig,) = g.node("Sigmoid", [gate])
        (act,) = g.node("Mul", [g.node("Mul", [gate, sig])[0], up])
        (y,) = g.node("Add", [x2, self._linear(g, act, [n["down"]], "fp32", f"l{i}.down")])
        return y

    @staticmethod
    def helper_plain(op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper

        return helper.make_node(op, inputs, outputs, **attrs)

