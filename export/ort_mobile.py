"""ORT Mobile: ``.ort`` copies of a bundle's graphs and the operators an app's onnxruntime needs.

Phone apps often ship a minimal onnxruntime built for their models (``--minimal_build`` with
``--include_ops_by_config``); it reads only the ``.ort`` (flatbuffer) format. The conversion
bakes in the graph optimizations (style ``Fixed``) for the target platform (``arm`` by
default: phones; the result also runs on x86), and ``required_operators.config`` lists every
operator of both graphs, for the build. The ``.onnx`` graphs stay in the bundle.

The ``.ort`` format keeps weights inside one flatbuffer, limited to 2 GiB: fine for drafts and
small targets; a 1.5B target with an fp16 embedding table is close to the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

CONFIG_NAME = "required_operators.config"


def write_ort_models(bundle: Path, roles: list[str], target_platform: str = "arm",
                     progress: Callable[[str], None] = lambda m: None) -> dict:
    """Write ``<role>/model.ort`` beside each ``<role>/model.onnx`` and ``required_operators.config``.

    Returns:
        The manifest's ``ort_mobile`` entry.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    progress(f"ORT Mobile: converting {', '.join(roles)} to .ort (optimized for {target_platform})")
    convert_onnx_models_to_ort(bundle, optimization_styles=[OptimizationStyle.Fixed], target_platform=target_platform)
    missing = [r for r in roles if not (bundle / r / "model.ort").is_file()]
    if missing:
        from edgellm.errors import ExportError

        raise ExportError(f"ORT Mobile conversion wrote no .ort file for {', '.join(missing)}")
    config = bundle / CONFIG_NAME
    lines = config.read_text().splitlines()  # its comments name the temporary folder: make them relative
    config.write_text("\n".join(line.replace(str(bundle) + "/", "") for line in lines) + "\n")
    return {"required_operators": CONFIG_NAME, "optimization_style": "Fixed", "target_platform": target_platform}
