"""Counting model calls: statistics per role, the one call meter, and the call ledger."""

import dspy
import pytest

from dspy_opro.counting import CallCounter, CallLedger, CallStats
from dspy_opro.testing import scripted_lm


def test_the_call_ledger_replays_its_events_survives_a_cut_line_and_belongs_to_one_run(tmp_path):
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


def test_a_meter_without_a_role_counts_each_call_under_its_lm_s_tag():
    meter = CallCounter(role=None)
    task = CallCounter.tag(scripted_lm(lambda call: "four words in all"), "task")
    prompt = CallCounter.tag(scripted_lm(lambda call: "two words"), "prompt")
    untagged = scripted_lm(lambda call: "x")
    counted = meter.counted(lambda example, prediction, trace=None: 1.0)
    with dspy.context(callbacks=[meter], usage_tracker=meter):
        task("q")
        task.copy(temperature=0.5)("q")  # a copy keeps its tag
        prompt("q", n=3)
        untagged("q")
        counted(None, None)
    assert (meter.calls["task"], meter.calls["prompt"], meter.calls["other"], meter.calls["nobody"]) == (2, 1, 1, 0)
    assert meter.completions["prompt"] == 3 and meter.metric_calls == 1
    assert meter.tokens["task"] == meter.of("task").prompt_tokens + meter.of("task").completion_tokens > 0


def test_a_counter_with_a_role_counts_every_call_as_its_own():
    stats = CallStats()
    counter = CallCounter(stats, role="prompt")
    tagged = CallCounter.tag(scripted_lm(lambda call: "x"), "task")
    with counter.context():
        tagged("q")
    assert counter.stats is stats and stats.calls == stats.succeeded == 1 and set(counter.roles) == {"prompt"}


def test_failed_calls_are_counted_by_kind_and_type():
    counter = CallCounter(role="task")
    broken = scripted_lm(lambda call: (_ for _ in ()).throw(ConnectionError("down")))
    with counter.context(), pytest.raises(Exception, match="down"):
        broken.copy(num_retries=0)("q")
    assert counter.stats.failed == {"transient": 1} and counter.stats.error_types == {"LMUnexpectedError": 1}
