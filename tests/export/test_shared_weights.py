"""share_weights: a second graph reads the weights it shares with a first graph from the first's data file."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from edgellm.export.shared_weights import share_weights


def _graph(folder, name, a, b):
    """y = x @ a @ b, both weights stored in ``name.data``."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["t"]), helper.make_node("MatMul", ["t", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    convert_model_to_external_data(model, location=name + ".data", size_threshold=0)
    onnx.save(model, str(folder / name))
    return folder / name


def test_shared_initializers_point_at_the_first_file_and_the_rest_stay(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3))
    first, second = _graph(tmp_path, "model.onnx", a, b), _graph(tmp_path, "step.onnx", a, c)
    x = rng.standard_normal((1, 64)).astype(np.float32)

    saved = share_weights(first, second)

    assert saved == a.nbytes
    locations = {t.name: {e.key: e.value for e in t.external_data}["location"]
                 for t in onnx.load(str(second), load_external_data=False).graph.initializer}
    assert locations == {"a": "model.onnx.data", "b": "step.onnx.data"}
    assert (tmp_path / "step.onnx.data").stat().st_size < a.nbytes + c.nbytes  # only c is left in it
    for path, w in ((first, b), (second, c)):
        (y,) = ort.InferenceSession(str(path)).run(None, {"x": x})
        np.testing.assert_allclose(y, x @ a @ w, rtol=1e-4, atol=1e-4)
