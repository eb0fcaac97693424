"""Execution providers: short names -> onnxruntime provider names and options.

A registry, not an if/elif chain. Every choice ends with the CPU provider so that operators a
provider does not take still run (onnxruntime places them on the CPU).
"""

from __future__ import annotations

import logging
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


PROVIDERS: dict[str, ProviderInfo] = {
    p.name: p
    for p in (
        ProviderInfo("cpu", "CPUExecutionProvider", platforms="everywhere"),
        ProviderInfo("xnnpack", "XnnpackExecutionProvider", platforms="Android, iOS, Linux/Arm"),
        ProviderInfo("coreml", "CoreMLExecutionProvider", {"ModelFormat": "MLProgram"}, "macOS, iOS"),
        ProviderInfo("nnapi", "NnapiExecutionProvider", platforms="Android"),
        ProviderInfo("qnn", "QNNExecutionProvider", {"backend_path": "libQnnHtp.so"},
                     "Qualcomm Snapdragon (HTP NPU); x86-64 Linux emulation"),
        ProviderInfo("dml", "DmlExecutionProvider", platforms="Windows (DirectML)"),
        ProviderInfo("webgpu", "WebGpuExecutionProvider", platforms="browsers, Windows, Linux, macOS"),
        ProviderInfo("openvino", "OpenVINOExecutionProvider", {"device_type": "CPU"}, "Intel CPU/GPU/NPU"),
        ProviderInfo("cuda", "CUDAExecutionProvider", platforms="NVIDIA GPUs"),
    )
}


@dataclass(frozen=True)
class ProviderChoice:
    """Arguments for ``InferenceSession``: providers in priority order and their options."""

    name: str
    providers: list[str]
    options: list[dict[str, Any]]


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build has."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p.name for p in PROVIDERS.values() if p.ort_name in have]


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
        msg = (f"provider {key!r} ({PROVIDERS[key].ort_name}) is not in this onnxruntime build; "
               f"available: {', '.join(avail)}")
        if not fallback:
            raise ProviderUnavailableError(msg + " (pass fallback=True / --fallback to use the CPU)")
        warnings.warn(msg + "; falling back to cpu", RuntimeWarning, stacklevel=2)
        key = "cpu"
    info = PROVIDERS[key]
    if key == "cpu":
        return ProviderChoice("cpu", ["CPUExecutionProvider"], [{}])
    return ProviderChoice(key, [info.ort_name, "CPUExecutionProvider"], [dict(info.options), {}])


def provider_table() -> list[dict[str, Any]]:
    """One row per known provider: name, onnxruntime name, installed or not, platforms."""
    avail = set(available_providers())
    return [
        {"name": p.name, "ort_name": p.ort_name, "available": p.name in avail, "platforms": p.platforms}
        for p in PROVIDERS.values()
    ]
