"""Static QDQ quantization of the npu graphs, calibrated on sample text (``--npu-quant qdq``).

NPUs run integer arithmetic: the static graph gets QuantizeLinear/DequantizeLinear pairs with
scales fixed at export. onnxruntime's quantizer, configured for QNN (``get_qnn_qdq_config``:
uint16 activations, uint8 weights here), calibrates the activation ranges by running the fp32
graph over windows of the sample text shipped with edgellm (the same text as the quality
report), with the cache filled as decoding would fill it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

CALIBRATION_WINDOWS = 16
# The attention scores (mask included) get one uint16 range: a -1e9 mask would leave every real
# score on one level (top-1 0.04 on the 0.5B). -1000 lies below the 0.5B's real scores (its fp32
# graph with -1000 matches -1e9 to 4e-5); the quality report shows when a model's do not.
QDQ_MASK_VALUE = -1000.0


class _WindowFeeds:
    """A calibration data reader: the inputs of successive windows of ``ids`` (fp32 graph run on the CPU)."""

    def __init__(self, graph: Path, entry: dict, ids: np.ndarray) -> None:
        from edgellm.runtimes.providers import resolve_provider
        from edgellm.runtimes.session import KVLayout
        from edgellm.runtimes.static_session import StaticDecoderSession

        kv = entry["kv_layout"]
        layout = KVLayout(entry["num_layers"], entry["num_kv_heads"], entry["head_dim"], entry["max_context"],
                          entry["vocab_size"], entry["io"])
        self.session = StaticDecoderSession(graph, layout, resolve_provider("cpu"), None, kv["window"],
                                            kv["rope_theta"], entry["num_heads"], mask_value=kv["mask_value"])
        w = kv["window"]
        self.windows = [ids[i : i + w] for i in range(0, len(ids), w)]

    def get_next(self) -> dict[str, np.ndarray] | None:
        if not self.windows:
            return None
        ids = self.windows.pop(0)
        feeds = {k: v.copy() for k, v in self.session.window_feeds(ids).items()}
        self.session.forward(ids, 1)  # advance the cache for the next window
        return feeds

    def rewind(self) -> None:  # the quantizer may read the data twice
        raise NotImplementedError


def quantize_npu_graph(graph: Path, entry: dict, ids: np.ndarray, say: Callable[[str], None],
                       weight_bits: int = 8) -> None:
    """Replace the fp32 static graph at ``graph`` by its QDQ version (in place).

    Args:
        graph: ``<name>.onnx`` with its weights in ``<name>.onnx.data``; afterwards the QDQ graph
            is ``<name>.onnx`` with weights in ``<name>_qdq.onnx.data``.
        entry: the model's manifest entry; ``kv_layout.window`` is this graph's window.
        ids: int64 ``(T,)`` calibration tokens, run ``window`` at a time.
        weight_bits: 8 (uint8 per output channel) or 4 (int4 per output channel, symmetric:
            what QNN's HTP takes).
    """
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    stem = graph.stem
    wtype = QuantType.QInt4 if weight_bits == 4 else QuantType.QUInt8
    say(f"quantizing {graph.parent.name}/{graph.name} to QDQ (uint16 activations, {wtype.name} weights), "
        f"calibrated on {len(ids)} tokens, {entry['kv_layout']['window']} per call")
    fp32 = graph.with_name(f"{stem}_fp32.onnx")  # still reads its weights from <stem>.onnx.data
    graph.rename(fp32)
    cfg = get_qnn_qdq_config(str(fp32), _WindowFeeds(fp32, entry, ids), activation_type=QuantType.QUInt16,
                             weight_type=wtype, per_channel=True)
    cfg.use_external_data_format = True
    tmp = graph.with_name(f"{stem}_qdq.onnx")
    quantize(str(fp32), str(tmp), cfg)
    fp32.unlink()
    graph.with_name(f"{stem}.onnx.data").unlink(missing_ok=True)
    tmp.rename(graph)  # the quantized graph names its data file <stem>_qdq.onnx.data: kept
