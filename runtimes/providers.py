"""Execution providers: short names -> onnxruntime provider names and options.

A registry, not an if/elif chain. Every choice ends with the CPU provider so that operators a
provider does not take still run (onnxruntime places them on the CPU).

Some providers also come as *plugin* packages for the stock onnxruntime (onnxruntime 1.23+
plugin EP API), e.g. ``onnxruntime-ep-openvino``: the package's library is registered with
onnxruntime, which then lists the devices it can drive; a plugin that is installed but finds
no device is reported as such.
"""

from __future__ import annotations

import logging
import platform
import warnings
from dataclasses import dataclass, field
from typing import Any

from edgellm.errors import ProviderUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProviderInfo:
    name: str
    ort_name: str
    options: dict[str, Any] = field(default_factory=dict)
    platforms: str = ""
    plugin: str | None = None  # Python package of a plugin EP: get_library_path(), get_ep_name()
    plugin_paths: dict[str, str] = field(default_factory=dict)  # option -> plugin function giving a path


PROVIDERS: dict[str, ProviderInfo] = {
    p.name: p
    for p in (
        ProviderInfo("cpu", "CPUExecutionProvider", platforms="everywhere"),
        ProviderInfo("xnnpack", "XnnpackExecutionProvider", platforms="Android, iOS, Linux/Arm"),
        ProviderInfo("coreml", "CoreMLExecutionProvider", {"ModelFormat": "MLProgram"}, "macOS, iOS"),
        ProviderInfo("nnapi", "NnapiExecutionProvider", platforms="Android"),
        ProviderInfo("qnn", "QNNExecutionProvider", {"backend_path": "libQnnHtp.so"},
                     "Qualcomm Snapdragon (HTP NPU); x86-64 Linux emulation",
                     plugin="onnxruntime_qnn", plugin_paths={"backend_path": "get_qnn_htp_path"}),
        ProviderInfo("dml", "DmlExecutionProvider", platforms="Windows (DirectML)"),
        ProviderInfo("webgpu", "WebGpuExecutionProvider", platforms="browsers, Windows, Linux, macOS"),
        ProviderInfo("openvino", "OpenVINOExecutionProvider", {"device_type": "CPU"}, "Intel CPU/GPU/NPU",
                     plugin="onnxruntime_ep_openvino"),
        ProviderInfo("cuda", "CUDAExecutionProvider", platforms="NVIDIA GPUs"),
    )
}


QNN_HOST_EMULATION = {"htp_arch": "75", "soc_model": "60"}


@dataclass(frozen=True)
class ProviderChoice:
    """Arguments for ``InferenceSession``: providers in priority order and their options, or,
    for a plugin EP, the onnxruntime devices to add to the session options."""

    name: str
    providers: list[str]
    options: list[dict[str, Any]]
    devices: tuple = ()
    device_options: dict[str, Any] = field(default_factory=dict)


def plugin_devices(info: ProviderInfo) -> list | None:
    """Devices a plugin EP offers (registering its library once); ``None`` when not installed."""
    import importlib

    import onnxruntime as ort

    if info.plugin is None or not hasattr(ort, "register_execution_provider_library"):
        return None
    try:
        mod = importlib.import_module(info.plugin)
    except ImportError:
        return None
    ep_name = mod.get_ep_name()
    if not any(d.ep_name == ep_name for d in ort.get_ep_devices()):
        try:
            ort.register_execution_provider_library(ep_name, mod.get_library_path())
        except Exception as e:  # noqa: BLE001 - already registered, or a broken install
            logger.debug("registering %s: %s", ep_name, e)
    return [d for d in ort.get_ep_devices() if d.ep_name == ep_name]


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime has (built in, or a plugin with a device)."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p.name for p in PROVIDERS.values() if p.ort_name in have or plugin_devices(p)]


def resolve_provider(name: str, *, fallback: bool = False) -> ProviderChoice:
    """Map a short provider name to session arguments.

    Args:
        name: a key of :data:`PROVIDERS` (case-insensitive).
        fallback: when the provider is missing, warn and use the CPU instead of raising.

    Raises:
        ProviderUnavailableError: unknown name, or not in this onnxruntime and no fallback.
    """
    key = (name or "cpu").lower()
    if key not in PROVIDERS:
        raise ProviderUnavailableError(
            f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}"
        )
    avail = available_providers()
    if key not in avail:
        devices = plugin_devices(PROVIDERS[key])
        why = ("its plugin package is installed but offers no device on this machine"
               if devices is not None else "it is not in this onnxruntime build")
        msg = f"provider {key!r} ({PROVIDERS[key].ort_name}): {why}; available: {', '.join(avail)}"
        if not fallback:
            raise ProviderUnavailableError(msg + " (pass fallback=True / --fallback to use the CPU)")
        warnings.warn(msg + "; falling back to cpu", RuntimeWarning, stacklevel=2)
        key = "cpu"
    info = PROVIDERS[key]
    if key == "cpu":
        return ProviderChoice("cpu", ["CPUExecutionProvider"], [{}])
    devices = plugin_devices(info)
    if devices:  # a plugin EP (once registered, onnxruntime also lists it by name; use the devices)
        import importlib

        mod = importlib.import_module(info.plugin)
        options = {**info.options, **{opt: getattr(mod, fn)() for opt, fn in info.plugin_paths.items()
                                      if hasattr(mod, fn)}}
        if key == "qnn" and platform.machine() in ("x86_64", "AMD64"):
            # the HTP backend on an x86-64 host is an emulator: it needs a chip to emulate (without
            # one it fails to finalize graphs); Snapdragon 8 Gen 3 (HTP v75)
            options.update(QNN_HOST_EMULATION)
        return ProviderChoice(key, [], [], devices=tuple(devices), device_options=options)
    return ProviderChoice(key, [info.ort_name, "CPUExecutionProvider"], [dict(info.options), {}])


def provider_table() -> list[dict[str, Any]]:
    """One row per known provider: name, onnxruntime name, installed or not, platforms, plugin state."""
    avail = set(available_providers())
    rows = []
    for p in PROVIDERS.values():
        devices = plugin_devices(p)
        plugin = None if p.plugin is None else ("not installed" if devices is None else
                                                f"installed, {len(devices)} device(s)")
        rows.append({"name": p.name, "ort_name": p.ort_name, "available": p.name in avail,
                     "platforms": p.platforms, "plugin": plugin})
    return rows


BUNDLE_KINDS = ("cpu", "npu")  # export --target-device values


def probe_provider(name: str) -> dict[str, str]:
    """Which bundle kinds a provider runs: for each, a tiny graph of that kind's operators
    (``edgellm/data/probe_<kind>.onnx``: cpu = MatMulNBits, GroupQueryAttention; npu = MatMul,
    ScatterElements (the in-graph cache write), Softmax) is loaded and run once, and
    onnxruntime's profile says where its nodes ran.

    Returns:
        ``{kind: "runs" | "loads, runs on the CPU fallback" | "fails: <error>"}``.
    """
    import json
    import tempfile
    from importlib import resources
    from pathlib import Path

    import numpy as np

    from edgellm.runtimes.graphs import open_session

    choice = resolve_provider(name)
    ort_name = PROVIDERS[choice.name].ort_name
    result = {}
    for kind in BUNDLE_KINDS:
        graph = Path(str(resources.files("edgellm").joinpath(f"data/probe_{kind}.onnx")))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                session, _ = open_session(graph, choice, 1, profile_prefix=str(Path(tmp) / "probe"))
                session.run(None, {"x": np.ones((1, 2, 32), np.float32)})
                events = json.loads(Path(session.end_profiling()).read_text())
            nodes = {e["name"]: e["args"].get("provider") for e in events
                     if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")}
            on_ep = sum(p == ort_name for p in nodes.values())
            result[kind] = ("runs" if on_ep == len(nodes) else
                            "loads, runs on the CPU fallback" if on_ep == 0 else
                            f"partly: {on_ep} of {len(nodes)} kernels on it, the rest on the CPU")
        except Exception as e:  # noqa: BLE001 - reported, not raised: this is a diagnosis
            result[kind] = f"fails: {type(e).__name__}: {str(e)[:120]}"
    return result
