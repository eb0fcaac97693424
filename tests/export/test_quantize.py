"""MatMulNBits packing: our numpy quantizer against onnxruntime's kernel."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from edgellm.export.quantize import pack_bits, quantize_blockwise, unpack_bits  # noqa: E402


def _run_matmul_nbits(a, p):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(p.data, "B"), numpy_helper.from_array(p.scales, "S")]
    ins = ["A", "B", "S"]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points, "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=p.K, N=p.N, bits=p.bits,
                            block_size=p.block_size, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, p.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, p.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


@pytest.mark.parametrize("bits,block,sym,k", [(4, 32, False, 64), (4, 32, True, 64), (4, 128, False, 96),
                                              (8, 32, False, 64), (8, 16, True, 48)])
def test_kernel_computes_our_dequantized_matrix(bits, block, sym, k):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, k)).astype(np.float32)
    p = quantize_blockwise(w, bits, block, sym)
    deq = p.dequantize()
    step = (w.max() - w.min()) / (2**bits - 1)
    assert np.abs(deq - w).max() <= step  # round-to-nearest
    a = rng.normal(size=(3, k)).astype(np.float32)
    np.testing.assert_allclose(_run_matmul_nbits(a, p), a @ deq.T, rtol=1e-4, atol=1e-4)


def test_pack_roundtrip():
    q = np.random.default_rng(1).integers(0, 16, (5, 7, 32)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_bits(pack_bits(q, 4), 4), q)
