"""npu bundles on Qualcomm's QNN HTP backend (emulated on x86-64 hosts).

Needs the optional plugin package: ``pip install onnxruntime-qnn``; skipped without it.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn", reason="needs onnxruntime-qnn (pip install onnxruntime-qnn)")
pytest.importorskip("torch")


@pytest.fixture(scope="module", params=["fp32", "qdq"])
def npu_bundle(request, tiny_model_dir, tmp_path_factory):
    from edgellm.export import export

    return export(tiny_model_dir, draft=tiny_model_dir, output=tmp_path_factory.mktemp("npu") / "b",
                  max_context=96, target_device="npu", npu_window=4, npu_quant=request.param, quality="none")


def test_npu_bundle_runs_on_qnn_like_on_cpu(npu_bundle):
    import edgellm

    prompt = "def foo(x): return"
    ref = edgellm.load(npu_bundle, threads=1).generate(prompt, mode="target", max_new_tokens=12).token_ids
    qnn = edgellm.load(npu_bundle, provider="qnn", threads=1)
    assert "QNNExecutionProvider" in qnn.target.session.session.get_providers()
    for mode in ("target", "speculative"):
        assert qnn.generate(prompt, mode=mode, max_new_tokens=12).token_ids == ref, mode
    mixed = edgellm.load(npu_bundle, provider="cpu", draft_provider="qnn", threads=1)
    assert mixed.generate(prompt, mode="speculative", max_new_tokens=12).token_ids == ref


def test_npu_graphs_are_placed_on_qnn(npu_bundle, tmp_path):
    """Where each kernel ran (onnxruntime's profile): the whole fp32 graph in QNN partitions; a QDQ
    graph's only CPU kernels are the Quantize/DequantizeLinear at its inputs and outputs."""
    import json
    from pathlib import Path

    from edgellm.bundle import read_manifest
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.graphs import open_session
    from edgellm.runtimes.static_session import StaticDecoderSession

    m = read_manifest(npu_bundle)
    entry = m.target.to_dict()
    feeds = StaticDecoderSession.from_entry(npu_bundle / m.target.graph, entry, resolve_provider("cpu"), 1) \
        .window_feeds(np.array([5, 6, 7], np.int64))
    session, _ = open_session(npu_bundle / m.target.graph, resolve_provider("qnn"), 1,
                              profile_prefix=str(tmp_path / "qnn"))
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [(e["args"].get("provider"), e["args"].get("op_name")) for e in events
               if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    on_cpu = {op for provider, op in kernels if provider == "CPUExecutionProvider"}
    assert any(provider == "QNNExecutionProvider" for provider, _ in kernels)
    assert on_cpu <= {"QuantizeLinear", "DequantizeLinear"}, on_cpu
    if m.target.quantization["quant"] == "fp32":
        assert not on_cpu
