"""The run history: clear errors for a file that cannot be resumed, and for a resume that is refused."""

import json

import dspy
import pytest
from opro_scripted import ScriptedOptimizer, make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.testing import scripted_lm


def opro(log_dir, **kwargs):
    settings = dict(
        prompt_model=ScriptedOptimizer().lm(),
        task_model=task_lm(),
        num_steps=1,
        candidates_per_step=2,
        show_progress=False,
        log_dir=str(log_dir),
    )
    return OPRO(metric, **{**settings, **kwargs})


def compile_(optimizer, student=None, trainset=None):
    return optimizer.compile(student or dspy.Predict("question -> answer"), trainset=trainset or make_trainset(6))


def test_an_incomplete_history_says_what_is_missing(tmp_path):
    compile_(opro(tmp_path))
    path = tmp_path / "opro_history.json"
    data = json.loads(path.read_text())
    del data["candidates"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="incomplete or damaged: it has no 'candidates' entry.*move it away"):
        compile_(opro(tmp_path))


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", "is not a run history"),
        ('{"format_version": 1, "candidates": []}', "incompatible version"),
        ('{"candidates": [', "cannot read the history"),
    ],
)
def test_a_file_that_is_not_a_history_is_refused_before_any_call(tmp_path, content, match):
    (tmp_path / "opro_history.json").write_text(content)
    optimizer = ScriptedOptimizer()
    with pytest.raises(ValueError, match=match):
        compile_(opro(tmp_path, prompt_model=optimizer.lm()))
    assert optimizer.prompts == []


def test_a_refused_resume_names_what_differs(tmp_path):
    compile_(opro(tmp_path))
    other = scripted_lm(lambda call: "x", model="scripted/other")
    with pytest.raises(ValueError, match=r"task_model: 'scripted/other' here, 'scripted/task' in the file"):
        compile_(opro(tmp_path, task_model=other))
    with pytest.raises(ValueError, match=r"temperature: 0.5 here, 1.0 in the file"):
        compile_(opro(tmp_path, temperature=0.5))
    with pytest.raises(ValueError, match=r"different trainset \(7 examples here, 6 in the file\)"):
        compile_(opro(tmp_path), trainset=make_trainset(7))
    with pytest.raises(ValueError, match=r"different trainset \(example 2 differs\)"):
        changed = make_trainset(6)
        changed[2] = dspy.Example(question="What is 0 plus 0?", answer="0").with_inputs("question")
        compile_(opro(tmp_path), trainset=changed)
    with pytest.raises(ValueError, match=r"predictor 'self': question -> result here, question -> answer in the file"):
        compile_(opro(tmp_path), student=dspy.Predict("question -> result"))


def test_the_call_ledger_replays_its_events_survives_a_cut_line_and_belongs_to_one_run(tmp_path):
    from dspy_opro.counting import CallLedger, CallStats

    path = tmp_path / "opro_calls.jsonl"
    ledger = CallLedger(path)
    assert ledger.open("run-a") is None
    ledger.write_base("task", CallStats(calls=5, requests=5, succeeded=5, prompt_tokens=50))
    ledger.record("task", {"event": "start"})
    ledger.record("task", {"event": "end", "outcome": "failed", "kind": "transient", "type": "LMServerError"})
    ledger.record("task", {"event": "retry"})
    ledger.record("prompt", {"event": "start"})  # in flight when the process was killed
    ledger.close()
    with open(path, "a") as handle:
        handle.write('{"event": "end", "role": "pro')  # the kill cut this line short

    again = CallLedger(path)
    totals = again.open("run-a")
    task, prompt = totals["task"], totals["prompt"]
    assert (task.calls, task.requests, task.succeeded, task.errors, task.retries) == (6, 6, 5, 1, 1)
    assert task.failed == {"transient": 1} and task.error_types == {"LMServerError": 1} and task.prompt_tokens == 50
    assert prompt.calls == 1 and prompt.interrupted == 1
    again.record("prompt", {"event": "end", "outcome": "cached"})
    again.close()
    assert CallLedger(path).open("run-a")["prompt"].cache_hits == 1  # written on a line of its own
    assert CallLedger(path).open("run-b") is None and path.read_text().count("\n") == 1  # another run starts afresh
