"""The optimizer benchmark's harness (benchmarks/optimizers.py): budgets, the results file, the report.

The end-to-end test runs the real script, with every optimizer, on a scripted model served as
``local/bench-scripted`` (task model and prompt model): the task model answers the plural task
only when its instruction mentions plurals, and the prompt model always proposes such an
instruction, so an optimizer that reaches its proposer and scores what it proposes ends at 100%.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from example_scripts import BENCHMARKS, loaded_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    with loaded_script(BENCHMARKS / "optimizers.py", "bench_optimizers") as module:
        yield module


def test_budgets_fit(bench):
    assert bench.copro_shape(300, 20) == (5, 3)  # 5 x 3 x 20 = 300 metric calls
    assert bench.copro_shape(200, 20) == (5, 2)
    assert bench.copro_shape(100, 20) == (5, 1)
    for budget in (100, 300, 400, 1000):
        breadth, depth = bench.copro_shape(budget, 20)
        assert breadth * depth * 20 <= budget
    trials, minibatch = bench.mipro_trials(300, 20)
    assert minibatch == 20 and trials == (300 - 40) // 23
    assert bench.expand_tasks(["demo", "suite", "plural"])[:2] == ["demo", "json_record"]
    assert bench.expand_tasks(["suite", "plural"]).count("plural") == 1


def test_results_file_round_trip_and_torn_line(bench, tmp_path):
    path = tmp_path / "r.jsonl"
    assert bench.read_results(path) == []
    one = {"task": "plural", "optimizer": "opro", "seed": 0, "budget": 300, "test_score": 50.0}
    bench.append_result(path, one)
    bench.append_result(path, {**one, "seed": 1, "test_score": 70.0})
    with path.open("a") as handle:
        handle.write('{"task": "plural", "optim')  # a write cut short
    records = bench.read_results(path)
    assert [r["seed"] for r in records] == [0, 1]
    assert bench.run_key(records[0]) != bench.run_key(records[1])
    assert bench.select(records, budget=300) == records and bench.select(records, budget=400) == []


def test_report_marks_the_best_optimizer(bench):
    def record(optimizer, seed, score):
        return {
            "task": "t",
            "optimizer": optimizer,
            "seed": seed,
            "test_score": score,
            "wall_s": 10.0,
            "metric_calls": 3,
        }

    records = [record("baseline", 0, 90.0), record("opro", 0, 40.0), record("opro", 1, 60.0), record("gepa", 0, 45.0)]
    records.append(record("gepa", 1, 45.0))
    text = bench.report(records)
    accuracy_row = text.splitlines()[4]
    assert accuracy_row.startswith("| t (1/2 seeds) | 90.0 | **50.0 ± 14.1** | 45.0 ± 0.0 |")


SCRIPTED = textwrap.dedent(
    """
    import json, re, runpy, sys
    from dspy_opro.local import register_generator
    from dspy_opro.tasks.suite import PLURALS

    GOOD = "Write the plural of the word."

    def reply(request):
        if request.prompt is not None:  # OPRO's "base" meta-prompt, a text completion
            return GOOD + "</TEXT>"
        word = re.fullmatch(r"Word: (\\w+)", request.user.strip())
        if word:  # the program being optimized
            return f"The plural is {PLURALS[word.group(1)]}." if "plural" in request.system.lower() else "A word."
        if "new_instruction" in request.system:  # GEPA's proposer through DSPy's JSONAdapter
            return json.dumps({"new_instruction": GOOD})
        form = request.user.split("Reply in this form:")[-1] if "Reply in this form:" in request.user else ""
        labels = re.findall(r"^(.+?): \\.\\.\\.$", form, re.M)
        return "\\n".join(f"{label}: {GOOD}" for label in labels) if labels else GOOD

    register_generator("bench-scripted", reply)
    sys.argv = ["optimizers.py"] + sys.argv[1:]
    runpy.run_path("benchmarks/optimizers.py", run_name="__main__")
    """
)


def _run(tmp_path, *extra):
    driver = tmp_path / "driver.py"
    driver.write_text(SCRIPTED)
    args = [
        "--tasks", "plural", "--task-model", "local/bench-scripted", "--prompt-model", "local/bench-scripted",
        "--budget", "48", "--train", "4", "--val", "4", "--test", "6", "--threads", "2",
        "--results", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "plot.png"), *extra,
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(driver), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_every_optimizer_runs_end_to_end_and_a_rerun_resumes(tmp_path):
    names = ["baseline", "opro", "opro-paper", "copro", "mipro", "gepa", "gepa-json"]
    out = _run(tmp_path, "--optimizers", *names)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_name = {r["optimizer"]: r for r in records}
    assert sorted(by_name) == sorted(names) and len(records) == len(names)
    assert by_name["baseline"]["test_score"] == 0.0 and by_name["baseline"]["metric_calls"] == 0
    for name in names[1:]:
        assert by_name[name]["test_score"] == 100.0, (name, by_name[name]["instructions"])
        assert "plural" in by_name[name]["instructions"][0].lower()
        assert by_name[name]["prompt_calls"] > 0 and by_name[name]["metric_calls"] > 0
    assert by_name["opro"]["metric_calls"] <= 48 and by_name["opro-paper"]["metric_calls"] <= 48
    assert by_name["copro"]["details"] == {**by_name["copro"]["details"], "breadth": 4, "depth": 3}
    for name in ("gepa", "gepa-json"):
        assert by_name[name]["details"]["proposed"] >= 1 and by_name[name]["details"]["accepted"] >= 1
    assert by_name["opro"]["details"]["chosen"]["instruction"] == "Write the plural of the word."
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert "| plural (1 seed) | 0.0 | **100.0** |" in out

    # Same settings again: every run is in the file, so nothing runs and the table is the same.
    again = _run(tmp_path, "--optimizers", *names)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(names)
    assert "seed 0" not in again and "| plural (1 seed) | 0.0 | **100.0** |" in again
    report = _run(tmp_path, "--report", "--optimizers", "baseline", "opro")
    assert "| task | baseline | opro |" in report
