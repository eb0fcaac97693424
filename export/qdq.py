"""Static QDQ quantization of the npu graphs, calibrated on sample text (``--npu-quant qdq``).

NPUs run integer arithmetic: the static graph gets QuantizeLinear/DequantizeLinear pairs with
scales fixed at export. onnxruntime's quantizer, configured for QNN (``get_qnn_qdq_config``:
uint16 activations; uint8 or int4 weights per output channel), places them; the activation
ranges come from running the fp32 graph over windows of the sample text shipped with edgellm
(the same text as the quality report), with the cache filled as decoding fills it.

The ranges are measured here rather than by the quantizer's own calibrator, which holds the
model in memory while a session holds another copy (a 1.5B fp32 graph is 7 GB): one session
runs a copy of the graph that also outputs every tensor to calibrate, keeping only each one's
running minimum and maximum, and the quantizer then reads them from a calibration cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgellm.runtimes.static_session import StaticDecoderSession

CALIBRATION_WINDOWS = 16


class _RangeRecorder(StaticDecoderSession):
    """A static session over a graph augmented with extra outputs; keeps their min and max."""

    def __init__(self, graph: Path, entry: dict, extra: list[str], channels: set[str] = frozenset()) -> None:
        from edgellm.runtimes.providers import resolve_provider
        from edgellm.runtimes.session import KVLayout

        kv = entry["kv_layout"]
        super().__init__(graph, KVLayout.from_entry(entry), resolve_provider("cpu"), None, kv["window"],
                         kv["rope_theta"], entry["num_heads"])
        self.extra, self.channels = extra, channels
        self.ranges: dict[str, tuple[float, float]] = {}
        self.absmax: dict[str, np.ndarray] = {}  # per last-axis channel, for the tensors in ``channels``

    def _record(self, name: str, value: np.ndarray) -> None:
        if name in self.channels:
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            self.absmax[name] = np.maximum(self.absmax[name], m) if name in self.absmax else m
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


def _record_ranges(graph: Path, entry: dict, ids: np.ndarray, tensors: set[str], model=None,
                   channels: set[str] = frozenset()) -> tuple[dict, dict]:
    """Min/max of ``tensors`` (and per-channel max |x| of ``channels``) over ``ids`` run a window at a
    time through ``graph`` (or ``model``, its proto)."""
    import onnx
    from onnx import TensorProto, helper

    model = model if model is not None else onnx.load(str(graph), load_external_data=False)
    g = model.graph
    extra = sorted((tensors | channels) - {v.name for v in g.input} - {v.name for v in g.output})
    g.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in extra)
    augmented = graph.with_name(f"{graph.stem}_calibration.onnx")  # beside it: same external data
    onnx.save(model, str(augmented))
    del g.output[len(g.output) - len(extra):]
    try:
        rec = _RangeRecorder(augmented, entry, extra, channels)
        w = entry["kv_layout"]["window"]
        for i in range(0, len(ids), w):
            rec.forward(ids[i : i + w], 1)
        return {k: v for k, v in rec.ranges.items() if k in tensors}, rec.absmax
    finally:
        augmented.unlink()


def prepare_for_qdq(graph: Path, entry: dict, ids: np.ndarray) -> dict:
    """Change the fp32 graph (in place, output unchanged) so that it quantizes well; one calibration pass.

    Two changes, both measured on Qwen2.5-1.5B (top-1 vs fp32 of its QDQ graph, 256 tokens):

    * **Mask values.** Each layer's ``l<i>.mask_value`` gets the smallest magnitude that still
      masks: a masked key's raw score lies within the layer's calibrated score range ``[lo, hi]``
      (an empty cache slot scores 0), every row's best real score is at least ``lo``, so
      ``-(hi - lo)`` puts every masked score below every row's maximum; 25 % and 100 more keep
      it there beyond the calibration text. A small magnitude keeps the uint16 range of the
      masked scores fine (the 0.5B with -1e9: every real score on one level, top-1 0.04).
    * **Smoothing the MLP's down projection** (SmoothQuant, alpha 0.5): its input carries the
      residual stream's outlier channels (thousands), so one uint16 range per tensor leaves the
      ordinary channels a few levels; with it float, top-1 went from 0.85 to 0.96. Input
      channel j is divided by ``s_j = sqrt(max|x_j| / max|W_j|)`` through the up projection's
      output column j (the input is ``silu(gate) * up``: linear in ``up``) and row j of the down
      weight is multiplied by it, which leaves the fp32 result unchanged.

    Returns:
        The changes, to apply to another graph of the same model too (the draft's step graph:
        the same weights then stay shareable).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    bias = {n.output[0]: next(i for i in n.input if i != "attention_mask") for n in model.graph.node
            if n.op_type == "Mul" and "attention_mask" in n.input}
    scores = {}  # mask-value initializer -> the scores it is added to
    for n in model.graph.node:
        if n.op_type == "Add" and any(i in bias for i in n.input):
            b = next(i for i in n.input if i in bias)
            scores[bias[b]] = next(i for i in n.input if i != b)
    downs = {}  # down-projection weight -> (its input tensor, the up-projection weight)
    for n in model.graph.node:
        w = next((i for i in n.input if i.endswith(".down.weight")), None)
        if n.op_type == "MatMul" and w and w.replace(".down.", ".up.") in inits:
            downs[w] = (next(i for i in n.input if i != w), w.replace(".down.", ".up."))
    ranges, absmax = _record_ranges(graph, entry, ids, set(scores.values()), model,
                                    channels={x for x, _ in downs.values()})
    masks = {name: -1.25 * (max(ranges[t][1], 0.0) - min(ranges[t][0], 0.0)) - 100.0 for name, t in scores.items()}
    smooth = {}
    for down, (x, up) in downs.items():
        w_max = np.abs(_external_array(graph.parent, inits[down])).max(axis=1)  # [intermediate, hidden] rows
        s = np.sqrt(np.maximum(absmax[x], 1e-5) / np.maximum(w_max, 1e-5))
        smooth[down] = (up, np.clip(s, 1e-2, 1e2).astype(np.float32))
    prepared = QDQPreparation(masks, smooth)
    prepared.apply(graph)
    return prepared


@dataclass
class QDQPreparation:
    """What :func:`prepare_for_qdq` changes in a graph: mask values by initializer, and the
    smoothing scales ``s`` ``(intermediate,)`` of each down-projection weight (with its up weight)."""

    mask_values: dict[str, float]
    smoothing: dict[str, tuple[str, np.ndarray]]

    def apply(self, graph: Path) -> None:
        """Write the mask values into ``graph`` and smooth its MLP weights (in its external data)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(graph), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        for name, value in self.mask_values.items():
            inits[name].CopyFrom(numpy_helper.from_array(np.array(value, np.float32), name))
        onnx.save(model, str(graph))
        for down, (up, s) in self.smoothing.items():
            _write_external(graph.parent, inits[down], _external_array(graph.parent, inits[down]) * s[:, None])
            _write_external(graph.parent, inits[up], _external_array(graph.parent, inits[up]) / s[None, :])

    def describe(self) -> dict:
        """For the manifest."""
        return {"mask_values": [round(v, 1) for v in self.mask_values.values()],
                "smoothed": f"{len(self.smoothing)} down projections (SmoothQuant, alpha 0.5)"}


def _external_array(folder: Path, tensor) -> np.ndarray:
    """An fp32 initializer stored in external data, read from its file."""
    ext = {e.key: e.value for e in tensor.external_data}
    with open(folder / ext["location"], "rb") as f:
        f.seek(int(ext.get("offset", 0)))
        data = f.read(int(ext["length"]))
    return np.frombuffer(data, np.float32).reshape(tuple(tensor.dims)).copy()


def _write_external(folder: Path, tensor, value: np.ndarray) -> None:
    """Overwrite an fp32 initializer's bytes in its external data file (same shape, same place)."""
    ext = {e.key: e.value for e in tensor.external_data}
    data = np.ascontiguousarray(value, np.float32).tobytes()
    assert len(data) == int(ext["length"]), tensor.name
    with open(folder / ext["location"], "r+b") as f:
        f.seek(int(ext.get("offset", 0)))
        f.write(data)


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
    del model
    ranges, _ = _record_ranges(graph, entry, ids, wanted)
    return TensorsData(CalibrationMethod.MinMax,
                       {k: (np.array(lo, np.float32), np.array(hi, np.float32)) for k, (lo, hi) in ranges.items()})


def quantize_npu_graph(graph: Path, entry: dict, ids: np.ndarray, say: Callable[[str], None],
                       weight_bits: int = 8, prepared: QDQPreparation | None = None) -> QDQPreparation:
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

    Returns:
        The changes made before quantizing.
    """
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

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
    cfg = get_qnn_qdq_config(str(fp32), None, activation_type=QuantType.QUInt16, weight_type=wtype, per_channel=True)
    ranges = calibrate_ranges(fp32, entry, ids, cfg.op_types_to_quantize)
    tmp = graph.with_name(f"{stem}_qdq.onnx")
    with tempfile.TemporaryDirectory(prefix="edgellm-calibration-") as d:
        cache = Path(d) / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(str(fp32), str(tmp), None, calibration_cache_path=cache,
                        calibrate_method=cfg.calibrate_method, quant_format=cfg.quant_format,
                        activation_type=cfg.activation_type, weight_type=cfg.weight_type,
                        op_types_to_quantize=cfg.op_types_to_quantize, nodes_to_quantize=cfg.nodes_to_quantize,
                        nodes_to_exclude=cfg.nodes_to_exclude, per_channel=cfg.per_channel,
                        reduce_range=cfg.reduce_range, use_external_data_format=True,
                        extra_options=cfg.extra_options)
    fp32.unlink()
    graph.with_name(f"{stem}.onnx.data").unlink(missing_ok=True)
    tmp.rename(graph)  # the quantized graph names its data file <stem>_qdq.onnx.data: kept
    return prepared
