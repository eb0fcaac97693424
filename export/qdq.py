"""Static QDQ quantization of the npu graphs, calibrated on sample text (``--npu-quant qdq``).

NPUs run integer arithmetic: the static graph gets QuantizeLinear/DequantizeLinear pairs with
scales fixed at export. onnxruntime's quantizer, configured for QNN (``get_qnn_qdq_config``:
uint16 activations; uint8 or int4 weights per output channel), places them; the activation
ranges come from running the fp32 graph over windows of the sample text shipped with edgellm
(the same text as the quality report), with the cache filled as decoding fills it.

The ranges are measured here rather than by the quantizer's own calibrator, which holds the
model in memory while a session holds another copy (a 1.5B fp32 graph is 7 GB): one session
runs a copy of the graph that also outputs every tensor to calibrate, keeping only each one's
running minimum and maximum, which then go to the quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgellm.runtimes.static_session import StaticDecoderSession

CALIBRATION_WINDOWS = 16
# Linear layers left float (fp16 on an NPU) with keep_float: the MLP's down projection, whose input
# carries the residual stream's outlier channels (thousands) that one uint16 range per tensor
# cannot hold with the ordinary ones. On Qwen2.5-1.5B's QDQ graph (vs fp32, 256 tokens): all
# quantized top-1 0.85 / KL 0.25; down projections float 0.96 / 0.021; SmoothQuant (scaling the
# outliers into the weights' per-channel scales) instead: 0.87 / 0.10 (alpha 0.25), 0.82 / 0.35 (0.5).
FLOAT_LAYERS = (".down.weight",)


class _RangeRecorder(StaticDecoderSession):
    """A static session over a graph augmented with extra outputs; keeps their min and max."""

    def __init__(self, graph: Path, entry: dict, extra: list[str]) -> None:
        from edgellm.runtimes.providers import resolve_provider
        from edgellm.runtimes.session import KVLayout

        kv = entry["kv_layout"]
        super().__init__(graph, KVLayout.from_entry(entry), resolve_provider("cpu"), None, kv["window"],
                         kv["rope_theta"], entry["num_heads"], cache_length=kv["cache_length"])
        self.extra = extra
        self.ranges: dict[str, tuple[float, float]] = {}

    def _record(self, name: str, value: np.ndarray) -> None:
        lo, hi = float(np.min(value)), float(np.max(value))
        old = self.ranges.get(name)
        self.ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def _run(self, session, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = session.run(names + self.extra, feeds)
        for name, value in zip(names + self.extra, outs):
            self._record(name, value)
        for name, value in feeds.items():
            if value.dtype == np.float32:
                self._record(name, value)
        return outs[: len(names)]


def _record_ranges(graph: Path, entry: dict, ids: np.ndarray, tensors: set[str], model=None) -> dict:
    """Min/max of ``tensors`` over ``ids`` run a window at a time through ``graph`` (or ``model``, its proto)."""
    import onnx
    from onnx import TensorProto, helper

    model = model if model is not None else onnx.load(str(graph), load_external_data=False)
    g = model.graph
    extra = sorted(tensors - {v.name for v in g.input} - {v.name for v in g.output})
    g.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in extra)
    augmented = graph.with_name(f"{graph.stem}_calibration.onnx")  # beside it: same external data
    onnx.save(model, str(augmented))
    del g.output[len(g.output) - len(extra):]
    try:
        rec = _RangeRecorder(augmented, entry, extra)
        w = entry["kv_layout"]["window"]
        for i in range(0, len(ids), w):
            rec.forward(ids[i : i + w], 1)
        return {k: v for k, v in rec.ranges.items() if k in tensors}
    finally:
        augmented.unlink()


def prepare_for_qdq(graph: Path, entry: dict, ids: np.ndarray) -> dict:
    """Fit the fp32 graph's attention masks to its scores (in place, output unchanged); one calibration pass.

    Each layer's ``l<i>.mask_value`` gets the smallest magnitude that still
      masks: a masked key's raw score lies within the layer's calibrated score range ``[lo, hi]``
      (an empty cache slot scores 0), every row's best real score is at least ``lo``, so
      ``-(hi - lo)`` puts every masked score below every row's maximum; 25 % and 100 more keep
      it there beyond the calibration text. A small magnitude keeps the uint16 range of the
    masked scores fine (the 0.5B with -1e9: every real score on one level, top-1 0.04).
    Returns:
        The changes, to apply to another graph of the same model too (the draft's step graph:
        the same weights then stay shareable).
    """
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    bias = {n.output[0]: next(i for i in n.input if i != "attention_mask") for n in model.graph.node
            if n.op_type == "Mul" and "attention_mask" in n.input}
    scores = {}  # mask-value initializer -> the scores it is added to
    for n in model.graph.node:
        if n.op_type == "Add" and any(i in bias for i in n.input):
            b = next(i for i in n.input if i in bias)
            scores[bias[b]] = next(i for i in n.input if i != b)
    ranges = _record_ranges(graph, entry, ids, set(scores.values()), model)
    masks = {name: -1.25 * (max(ranges[t][1], 0.0) - min(ranges[t][0], 0.0)) - 100.0 for name, t in scores.items()}
    prepared = QDQPreparation(masks)
    prepared.apply(graph)
    return prepared


@dataclass
class QDQPreparation:
    """What :func:`prepare_for_qdq` changes in a graph: the mask values, by initializer name."""

    mask_values: dict[str, float]

    def apply(self, graph: Path) -> None:
        """Write the mask values into ``graph``."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(graph), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        for name, value in self.mask_values.items():
            inits[name].CopyFrom(numpy_helper.from_array(np.array(value, np.float32), name))
        onnx.save(model, str(graph))


def calibrate_ranges(graph: Path, entry: dict, ids: np.ndarray, op_types: list[str] | None):
    """Min/max of every float tensor that the quantizer will quantize, over ``ids`` run a window at a time.

    Args:
        graph: the fp32 static graph (weights in external data beside it).
        entry: the model's manifest entry; ``kv_layout.window`` is this graph's window.
        ids: int64 ``(T,)`` calibration tokens.
        op_types: the operator types the quantizer handles (``None``: all), like its calibrator.

    Returns:
        onnxruntime's ``TensorsData`` (MinMax).
    """
    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    model = onnx.shape_inference.infer_shapes(onnx.load(str(graph), load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {t.name for t in g.initializer}
    wanted = {t for n in g.node if op_types is None or n.op_type in op_types for t in list(n.input) + list(n.output)
              if t and t not in inits and types.get(t) == TensorProto.FLOAT}
    tied = _cache_groups(g, entry["io"], entry["num_layers"])
    del model
    ranges = _record_ranges(graph, entry, ids, wanted)
    for group in tied:  # one range, so one scale, for every form of a layer's keys (and values)
        present = [ranges[t] for t in group if t in ranges]
        union = (min(lo for lo, _ in present), max(hi for _, hi in present))
        ranges.update({t: union for t in group if t in ranges})
    return TensorsData(CalibrationMethod.MinMax,
                       {k: (np.array(lo, np.float32), np.array(hi, np.float32)) for k, (lo, hi) in ranges.items()})


def _cache_groups(g, io: dict, num_layers: int) -> list[set[str]]:
    """Per layer and K/V: the past input, the new entries, the present output and the cache they are written into.

    They must share one quantization range. A key reaches attention either fresh (computed in
    this window) or through the cache (an earlier window's present output, fed back as past);
    with one scale both paths quantize it to the same integer, so a token's result does not
    depend on whether the tokens before it were verified in its window or decoded one by one —
    the exactness of speculative decoding rests on that. Different scales broke it on the real
    1.5B (one prompt in three diverged).
    """
    producer = {o: n for n in g.node for o in n.output}
    groups = []
    for i in range(num_layers):
        for kind in ("key", "value"):
            past, present = io[f"past_{kind}"] % i, io[f"present_{kind}"] % i
            fresh = producer[present].input[0] if producer[present].op_type == "Identity" else present
            written = [n.output[0] for n in g.node if n.op_type == "ScatterElements" and past in n.input]
            groups.append({past, present, fresh, *written})
    return groups


def _keep_float(graph: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Store the weights named ``*<suffix>`` as fp16 behind a Cast (in place); returns their MatMul nodes.

    Those MatMuls are then left out of quantization: an NPU runs them in fp16.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    matmuls, casts = [], []
    data = graph.with_name(f"{graph.stem}_fp16.onnx.data")
    with open(data, "wb") as out:
        for n in g.node:
            w = next((i for i in n.input if i in inits and i.endswith(suffixes)), None)
            if n.op_type != "MatMul" or w is None:
                continue
            t = inits[w]
            ext = {e.key: e.value for e in t.external_data}
            with open(graph.parent / ext["location"], "rb") as f:
                f.seek(int(ext.get("offset", 0)))
                half = np.frombuffer(f.read(int(ext["length"])), np.float32).reshape(tuple(t.dims)).astype(np.float16)
            out.write(b"\0" * ((-out.tell()) % 4096))
            new = numpy_helper.from_array(half, w + ".fp16")
            new.ClearField("raw_data")
            new.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(out.tell())), ("length", str(half.nbytes))):
                e = new.external_data.add()
                e.key, e.value = k, v
            out.write(half.tobytes())
            g.initializer.remove(t)
            g.initializer.append(new)
            casts.append(helper.make_node("Cast", [w + ".fp16"], [w], name=w + ".cast", to=TensorProto.FLOAT))
            matmuls.append(n.name)
    nodes = casts + list(g.node)  # the casts read only initializers: first keeps the order topological
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(graph))
    return matmuls


def quantize_npu_graph(graph: Path, entry: dict, ids: np.ndarray, say: Callable[[str], None],
                       weight_bits: int = 8, prepared: QDQPreparation | None = None,
                       keep_float: tuple[str, ...] = ()) -> QDQPreparation:
    """Replace the fp32 static graph at ``graph`` by its QDQ version (in place).

    Args:
        graph: ``<name>.onnx`` with its weights in ``<name>.onnx.data``; afterwards the QDQ graph
            is ``<name>.onnx`` with weights in ``<name>_qdq.onnx.data``.
        entry: the model's manifest entry; ``kv_layout.window`` is this graph's window.
        ids: int64 ``(T,)`` calibration tokens, run ``window`` at a time.
        weight_bits: 8 (uint8 per output channel) or 4 (int4 per output channel, symmetric:
            what QNN's HTP takes).
        prepared: the changes :func:`prepare_for_qdq` made to another graph of this model, to
            make here too; ``None``: measure them on this graph.
        keep_float: suffixes of weight names whose linear layers stay float, weights stored fp16
            (e.g. :data:`FLOAT_LAYERS`).

    Returns:
        The changes made before quantizing.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    stem = graph.stem
    wtype = QuantType.QInt4 if weight_bits == 4 else QuantType.QUInt8
    say(f"quantizing {graph.parent.name}/{graph.name} to QDQ (uint16 activations, {wtype.name} weights), "
        f"calibrated on {len(ids)} tokens, {entry['kv_layout']['window']} per call")
    fp32 = graph.with_name(f"{stem}_fp32.onnx")  # still reads its weights from <stem>.onnx.data
    graph.rename(fp32)
    if prepared is None:
        prepared = prepare_for_qdq(fp32, entry, ids)
    else:
        prepared.apply(fp32)
    float_nodes = _keep_float(fp32, keep_float) if keep_float else []
    cfg = get_qnn_qdq_config(str(fp32), None, activation_type=QuantType.QUInt16, weight_type=wtype, per_channel=True,
                             nodes_to_exclude=float_nodes)
    ranges = calibrate_ranges(fp32, entry, ids, cfg.op_types_to_quantize)
    tmp = graph.with_name(f"{stem}_qdq.onnx")
    # what quantize_static does once it has the ranges (its own calibrator would hold two copies)
    quantizer = QDQQuantizer(load_model_with_shape_infer(fp32), cfg.per_channel, cfg.reduce_range, cfg.weight_type,
                             cfg.activation_type, ranges, cfg.nodes_to_quantize, cfg.nodes_to_exclude,
                             cfg.op_types_to_quantize, cfg.extra_options)
    quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(tmp), use_external_data_format=True)
    del quantizer
    fp32.unlink()
    graph.with_name(f"{stem}.onnx.data").unlink(missing_ok=True)
    graph.with_name(f"{stem}_fp32_fp16.onnx.data").unlink(missing_ok=True)
    tmp.rename(graph)  # the quantized graph names its data file <stem>_qdq.onnx.data: kept
    return prepared
