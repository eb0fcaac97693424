"""benchmarks/step_time.py on the tiny bundle: one JSON document last, a time per bundle and row count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_time.py"


def test_step_time_reports_every_bundle_and_row_count(tiny_bundle):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tiny_bundle), "--repeats", "3", "--past", "20",
                          "--threads", "1"], capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    r = doc["bundles"][tiny_bundle.name]
    assert r["ms_1_rows"] > 0 and r["ms_2_rows"] > 0 and 0 <= r["mean_kl"] < 1
    assert r["quantization"]["quant"] == "int4" and tiny_bundle.name in out.stderr
