"""npu bundles on Qualcomm's QNN HTP backend (emulated on x86-64 hosts).

Needs the optional plugin package: ``pip install onnxruntime-qnn``; skipped without it.
"""

from __future__ import annotations

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
