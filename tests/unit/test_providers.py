"""Provider registry: built-in providers and plugin EPs (faked: no plugin is installed in CI)."""

from __future__ import annotations

import sys
import types

import onnxruntime as ort
import pytest

from edgellm.errors import ProviderUnavailableError
from edgellm.runtimes.providers import available_providers, provider_table, resolve_provider


@pytest.fixture()
def fake_openvino_plugin(monkeypatch):
    """Install a fake ``onnxruntime_ep_openvino``; the test sets ``state["devices"]``."""
    state = {"devices": [], "registered": []}
    mod = types.ModuleType("onnxruntime_ep_openvino")
    mod.get_ep_name = lambda: "OpenVINOExecutionProvider"
    mod.get_library_path = lambda: "/opt/fake/libonnxruntime_providers_openvino_plugin.so"
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", mod)
    cpu = types.SimpleNamespace(ep_name="CPUExecutionProvider")
    monkeypatch.setattr(ort, "get_ep_devices", lambda: [cpu] + (state["devices"] if state["registered"] else []),
                        raising=False)
    monkeypatch.setattr(ort, "register_execution_provider_library",
                        lambda name, path: state["registered"].append((name, path)), raising=False)
    return state


def test_cpu_always_resolves():
    choice = resolve_provider("CPU")
    assert choice.providers == ["CPUExecutionProvider"] and not choice.devices


def test_plugin_without_device_says_so(fake_openvino_plugin):
    with pytest.raises(ProviderUnavailableError, match="plugin package is installed but offers no device"):
        resolve_provider("openvino")
    assert fake_openvino_plugin["registered"][0][0] == "OpenVINOExecutionProvider"
    with pytest.warns(RuntimeWarning, match="falling back to cpu"):
        assert resolve_provider("openvino", fallback=True).name == "cpu"
    row = next(r for r in provider_table() if r["name"] == "openvino")
    assert row["plugin"] == "installed, 0 device(s)" and not row["available"]


def test_plugin_with_a_device_is_used_through_session_options(fake_openvino_plugin):
    dev = types.SimpleNamespace(ep_name="OpenVINOExecutionProvider")
    fake_openvino_plugin["devices"].append(dev)
    assert "openvino" in available_providers()
    choice = resolve_provider("openvino")
    assert choice.devices == (dev,) and choice.providers == [] and choice.device_options == {"device_type": "CPU"}


def test_unknown_and_missing_providers_name_what_is_available():
    with pytest.raises(ProviderUnavailableError, match="unknown provider 'tpu'; known: cpu, xnnpack"):
        resolve_provider("tpu")
    with pytest.raises(ProviderUnavailableError, match="not in this onnxruntime build; available: cpu"):
        resolve_provider("coreml")


def test_qnn_plugin_gets_the_htp_backend_from_its_package(monkeypatch):
    mod = types.ModuleType("onnxruntime_qnn")
    mod.get_ep_name = lambda: "QNNExecutionProvider"
    mod.get_library_path = lambda: "/opt/fake/libonnxruntime_providers_qnn.so"
    mod.get_qnn_htp_path = lambda: "/opt/fake/libQnnHtp.so"
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", mod)
    dev = types.SimpleNamespace(ep_name="QNNExecutionProvider")
    monkeypatch.setattr(ort, "get_ep_devices", lambda: [dev], raising=False)
    monkeypatch.setattr(ort, "register_execution_provider_library", lambda name, path: None, raising=False)
    choice = resolve_provider("qnn")
    assert choice.devices == (dev,) and choice.device_options["backend_path"] == "/opt/fake/libQnnHtp.so"
    import platform

    from edgellm.runtimes.providers import QNN_HOST_EMULATION

    if platform.machine() == "x86_64":  # the host emulator gets a chip to emulate
        assert QNN_HOST_EMULATION.items() <= choice.device_options.items()


def test_probe_says_the_cpu_runs_both_bundle_kinds():
    from edgellm.runtimes.providers import probe_provider

    assert probe_provider("cpu") == {"cpu": "runs", "npu": "runs"}
