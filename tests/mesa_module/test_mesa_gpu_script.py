"""The prepared accelerator check (benchmarks/mesa_gpu.py) runs end to end on the CPU."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mesa_gpu.py"


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path):
    out = tmp_path / "mesa_gpu.json"
    main = runpy.run_path(str(SCRIPT))["main"]
    argv = ["--device", "cpu", "--quick", "--threads", "1", "--T", "64", "--budget", "60", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    cases = {(r["case"], r["dtype"], r["method"]) for r in report["correctness"]}
    assert ("packed_gated", "float32", "chunk") in cases and ("gated", "float64", "recurrent") in cases
    assert all(r["ok"] for r in report["correctness"])
    assert {r["method"] for r in report["speed"]} >= {"sdpa", "chunk", "chunk_gated", "chunk_packed"}
