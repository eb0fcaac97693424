"""`import edgellm` must stay light: no torch, no onnx, no click, not even onnxruntime."""

from __future__ import annotations

import subprocess
import sys


def test_import_edgellm_pulls_in_no_heavy_module():
    code = (
        "import sys, edgellm, edgellm.api, edgellm.speculative, edgellm.sampling, edgellm.manifest;"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'click', 'optimum') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_runtime_modules_do_not_import_the_exporter():
    code = (
        "import sys, edgellm.api, edgellm.runtimes.session, edgellm.runtimes.providers;"
        "print([m for m in sys.modules if m.startswith('edgellm.export')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
