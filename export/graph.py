"""What every graph builder shares: a writer that streams weights to one external-data file, and
the linear layers (MatMulNBits over int4/int8 or GGUF blocks, MatMul over fp16/fp32 weights).

:class:`edgellm.export.builder.DecoderBuilder` (fused onnxruntime graphs) and
:class:`edgellm.export.static_builder.StaticDecoderBuilder` (static standard-operator graphs) are
siblings over :class:`LinearLayers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from edgellm.errors import ConfigError
from edgellm.export.quantize import PackedWeight, concat_rows, quantize_blockwise

if TYPE_CHECKING:
    from edgellm.export.builder import QuantConfig
    from edgellm.export.source import Source

OPSET = 17
# IR 10 (onnx 1.16) covers opset 21, the newest the graphs use; onnx's default (the newest IR)
# would lock out older onnxruntime builds, which phones and OpenVINO's onnxruntime still ship
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"


class GraphWriter:
    """Collects nodes; streams large initializers to one external data file."""

    def __init__(self, data_path: Path) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.TensorProto = helper, numpy_helper, TensorProto
        self.data_path = data_path
        self._f = open(data_path, "wb")
        self.nodes: list = []
        self.inits: list = []
        self._n = 0
        self._small: dict[str, str] = {}  # small constants by name: each layer may ask for the same one

    def close(self) -> None:
        self._f.close()

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < 4096:
            key = arr.dtype.str + str(arr.shape) + arr.tobytes().hex()
            if name in self._small:
                if self._small[name] != key:
                    raise ValueError(f"two different constants named {name!r}")
                return name
            self._small[name] = key
            self.inits.append(self.numpy_helper.from_array(arr, name))
            return name
        pad = (-self._f.tell()) % 4096  # page-aligned so onnxruntime can map it
        self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(arr.tobytes())
        t = self.TensorProto()
        t.name = name
        t.data_type = self.helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = self.TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=outs[0], domain=domain or None, **attrs))
        return outs


class LinearLayers:
    """A builder's weights as graph nodes: ``x @ W.T`` in the storage its :class:`QuantConfig` says."""

    def __init__(self, source: Source, quant: QuantConfig, progress: Callable[[str], None] | None = None) -> None:
        from onnx import TensorProto

        self.src, self.spec, self.q = source, source.spec, quant
        self.features = source.spec.features
        self.progress = progress or (lambda msg: None)
        # quant="gguf": which weights kept their GGUF blocks exactly, and which were re-quantized
        self.kept: dict[str, str] = {}
        self.requantized: list[str] = []
        self.act = np.float16 if quant.activations == "fp16" else np.float32  # activation dtype
        self.TensorProto = TensorProto
        self._act_type = TensorProto.FLOAT16 if self.act == np.float16 else TensorProto.FLOAT

    def _linear(self, g: GraphWriter, x: str, names: list[str], quant: str, tag: str,
                rows: np.ndarray | None = None, along_input: bool = False) -> str:
        """``x @ concat(W_names).T`` (+ biases when the source has them), only output ``rows`` if given.

        ``along_input``: the matrices are joined along their input dimension instead (``x`` is
        their inputs side by side; a mixture of experts' down projections), without biases.
        Its output is named ``<tag>.output``: where :func:`edgellm.export.lora.add_branches` adds a
        LoRA branch (a renamed tensor: the graph and its speed do not change).
        """
        y = self._linear_body(g, x, names, quant, tag, rows, along_input)
        last = g.nodes[-1]
        assert last.output[0] == y, "the linear layer's output comes from the node written last"
        last.output[0] = f"{tag}.output"
        return last.output[0]

    def _linear_body(self, g: GraphWriter, x: str, names: list[str], quant: str, tag: str,
                     rows: np.ndarray | None = None, along_input: bool = False) -> str:
        if along_input:
            w = np.concatenate([self.src.tensor(n) for n in names], axis=1)
            if any(self.src.has(n.replace(".weight", ".bias")) for n in names):
                raise ConfigError(f"{tag}: matrices joined along their input take no biases")
            quant = "int8" if quant == "gguf" else quant
            if quant in ("int4", "int8"):
                packed = quantize_blockwise(w, 4 if quant == "int4" else 8, self.q.block_size, self.q.symmetric)
                return self._matmul_nbits(g, x, packed, tag)
            return self._float_matmul(g, x, w.T, quant, tag)
        if quant == "gguf":
            natives = [self.src.native(n) for n in names]
            if all(w is not None for w in natives):
                if rows is not None:
                    natives = [w.permute_rows(rows) for w in natives]
                y = self._native_linear(g, x, natives, tag)
                self.kept.update({n: w.source_type for n, w in zip(names, natives)})
                return self._add_bias(g, y, names, tag, rows)
            del natives
            self.requantized += names
            quant = "int8"
        mats = [self.src.tensor(n) if rows is None else self.src.tensor(n)[rows] for n in names]
        if quant in ("int4", "int8"):
            bits = 4 if quant == "int4" else 8
            packed = concat_rows([quantize_blockwise(m, bits, self.q.block_size, self.q.symmetric) for m in mats])
            del mats
            y = self._matmul_nbits(g, x, packed, tag)
        else:
            w = np.concatenate(mats, axis=0).T
            del mats
            y = self._float_matmul(g, x, w, quant, tag)
        return self._add_bias(g, y, names, tag, rows)

    def _float_matmul(self, g: GraphWriter, x: str, w: np.ndarray, quant: str, tag: str) -> str:
        """``x @ w`` with ``w`` ``(in, out)`` stored fp16 or fp32."""
        dtype = np.float16 if quant == "fp16" else np.float32
        wname = g.const(tag + ".weight", np.ascontiguousarray(w.astype(dtype)))
        if dtype != self.act:
            (wname,) = g.node("Cast", [wname], to=self._act_type)
        return g.node("MatMul", [x, wname])[0]

    def _add_bias(self, g: GraphWriter, y: str, names: list[str], tag: str, rows: np.ndarray | None = None) -> str:
        biases = [n.replace(".weight", ".bias") for n in names]
        if all(self.src.has(b) for b in biases):
            bias = np.concatenate([self.src.tensor(b) for b in biases]).astype(self.act)
            bias = bias if rows is None else bias[rows]
            (y,) = g.node("Add", [y, g.const(tag + ".bias", bias)])
        return y

    def _native_linear(self, g: GraphWriter, x: str, natives: list, tag: str) -> str:
        """GGUF blocks as MatMulNBits; weights stored alike share one node, the rest are concatenated."""
        from edgellm.export.gguf_blocks import stack

        groups: list[list] = []
        for w in natives:
            if groups and groups[-1][0].key == w.key:
                groups[-1].append(w)
            else:
                groups.append([w])
        outs = []
        for j, group in enumerate(groups):
            w, t = stack(group), tag if len(groups) == 1 else f"{tag}.{j}"
            y = self._matmul_nbits(g, x, w.packed(), t)
            if w.minimum is not None:  # x @ W.T = MatMulNBits(x) - blocksum(x) @ minimum.T
                nb = w.codes.shape[1] // w.block_size
                (xb,) = g.node("Reshape", [x, g.const(t + ".block_shape", np.array([0, 0, nb, w.block_size], np.int64))])
                (sums,) = g.node("ReduceSum", [xb, g.const(t + ".last_axis", np.array([-1], np.int64))], keepdims=0)
                (corr,) = g.node("MatMul", [sums, g.const(t + ".minimum", np.ascontiguousarray(w.minimum.T))])
                (y,) = g.node("Sub", [y, corr])
            outs.append(y)
        return outs[0] if len(outs) == 1 else g.node("Concat", outs, axis=-1)[0]

    def _matmul_nbits(self, g: GraphWriter, x: str, p: PackedWeight, tag: str) -> str:
        ins = [x, g.const(tag + ".qweight", p.data), g.const(tag + ".scales", p.scales.astype(self.act))]
        if p.zero_points is not None:
            ins.append(g.const(tag + ".zero_points", p.zero_points))
        (y,) = g.node("MatMulNBits", ins, domain=MS_DOMAIN, K=p.K, N=p.N, bits=p.bits,
                      block_size=p.block_size, accuracy_level=self.q.accuracy_level)
        return y
