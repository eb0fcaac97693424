"""Bundles on Intel's OpenVINO execution provider, on this machine's CPU.

Needs onnxruntime built with OpenVINO, which replaces the stock onnxruntime, so it lives in its own
environment: ``pip install onnxruntime-openvino`` (1.24.1 here) there; skipped without it.
"""

from __future__ import annotations

import pytest

ort = pytest.importorskip("onnxruntime")
if "OpenVINOExecutionProvider" not in ort.get_available_providers():
    pytest.skip("needs onnxruntime-openvino (its own environment: it replaces onnxruntime)", allow_module_level=True)
pytest.importorskip("torch")

PROMPT = "def foo(x): return"


@pytest.fixture(scope="module", params=["cpu", "gpu", "npu", "npu-qdq"])
def bundle(request, tiny_model_dir, tmp_path_factory):
    from edgellm.export import export

    device, _, quant = request.param.partition("-")
    return request.param, export(tiny_model_dir, draft=tiny_model_dir, output=tmp_path_factory.mktemp("ov") / "b",
                                 max_context=96, target_device=device, npu_window=4, npu_quant=quant or "fp32",
                                 quality="none")


def _loads_without_cpu_fallback(graph) -> bool:
    """Whether onnxruntime can place every node of ``graph`` on OpenVINO (it refuses otherwise)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(str(graph), so, providers=["OpenVINOExecutionProvider"],
                             provider_options=[{"device_type": "CPU"}])
        return True
    except Exception:  # noqa: BLE001 - onnxruntime says "nodes assigned to the CPU EP" in a Fail
        return False


def test_bundle_runs_on_openvino_like_on_cpu(bundle):
    import edgellm
    from edgellm.bundle import read_manifest

    kind, path = bundle
    ref = edgellm.load(path, threads=1).generate(PROMPT, mode="target", max_new_tokens=12).token_ids
    ov = edgellm.load(path, provider="openvino", threads=1)
    assert ov.target.session.session.get_providers()[0] == "OpenVINOExecutionProvider"
    for mode in ("target", "speculative"):
        assert ov.generate(PROMPT, mode=mode, max_new_tokens=12).token_ids == ref, mode
    mixed = edgellm.load(path, provider="cpu", draft_provider="openvino", threads=1)
    assert mixed.generate(PROMPT, mode="speculative", max_new_tokens=12).token_ids == ref
    # npu graphs are standard operators: all of them on OpenVINO; cpu/gpu graphs keep
    # GroupQueryAttention (an onnxruntime contrib op) on the CPU EP
    m = read_manifest(path)
    graphs = [m.target.graph, m.draft.graph] + ([m.draft.step_graph] if m.draft.step_graph else [])
    assert all(_loads_without_cpu_fallback(path / g) for g in graphs) == kind.startswith("npu")
