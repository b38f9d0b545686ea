"""The run kit both OPRO loops share: argument checks, former names, the state file and the resume refusal."""

import json
import warnings

import dspy
import pytest
from opro_scripted import ScriptedOptimizer, make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.counting import CallStats
from dspy_opro.history import Counts
from dspy_opro.numeric import LinearRegression, optimize
from dspy_opro.numeric.history import NumericCounts
from dspy_opro.run import (
    DETAILS,
    NOT_SAVED,
    Checkpoint,
    check_int,
    check_temperature,
    differences,
    fingerprint,
    take_renamed,
)
from dspy_opro.testing import scripted_lm


def test_former_names_warn_set_the_new_argument_and_are_named_in_errors():
    extra = {"proposals_per_step": 3, "other": 1}
    with pytest.warns(DeprecationWarning, match="proposals_per_step is deprecated; use candidates_per_step"):
        given = take_renamed(extra, {"proposals_per_step": "candidates_per_step"}, candidates_per_step=8)
    assert given["candidates_per_step"] == 3 and given.name("candidates_per_step") == "proposals_per_step"
    assert extra == {"other": 1}  # what is not a former name is left for the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = take_renamed({}, {"proposals_per_step": "candidates_per_step"}, candidates_per_step=8)
    assert plain["candidates_per_step"] == 8 and plain.name("candidates_per_step") == "candidates_per_step"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: check_int("n", True, minimum=0), TypeError, "n must be an integer, got True"),
        (lambda: check_int("n", 2.0, minimum=0), TypeError, "n must be an integer"),
        (lambda: check_int("n", -1, minimum=0), ValueError, "n must be at least 0, got -1"),
        (lambda: check_temperature(2.5), ValueError, r"temperature must be a number in \[0, 2\]"),
        (lambda: check_temperature("1"), ValueError, "temperature must be a number"),
    ],
)
def test_argument_checks_say_what_is_wrong(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_differences_name_the_setting_or_the_example_that_differs():
    assert differences("settings", {"a": 1, "b": 2}, {"a": 1, "b": 3}) == " (b: 2 here, 3 in the file)"
    assert differences("trainset", ["x", "y"], ["x"]) == " (2 examples here, 1 in the file)"
    assert differences("trainset", ["x", "y"], ["x", "z"]) == " (example 1 differs)"
    assert differences("valset", ["x"], None) == " (1 examples here, none in the file)"
    assert differences("settings", {"a": 1}, NOT_SAVED) == ""  # a file written before details were kept
    long = differences("problem", {"y": list(range(100))}, {"y": []})
    assert long.endswith("in the file)") and "..." in long  # long values are cut


def test_a_fingerprint_digests_each_part_and_keeps_its_details():
    prints = fingerprint({"settings": {"a": 1}, "trainset": [("x", [])]}, {"settings": {"a": 1}, "trainset": ["d"]})
    assert set(prints) == {"settings", "trainset", DETAILS} and prints[DETAILS]["trainset"] == ["d"]
    assert prints["settings"] == fingerprint({"settings": {"a": 1}})["settings"]
    assert prints["settings"] != fingerprint({"settings": {"a": 2}})["settings"]


def test_a_numeric_resume_refusal_names_what_differs(tmp_path):
    lm = scripted_lm(lambda call: "[1, 2]")
    optimize(LinearRegression(seed=1), prompt_model=lm, num_steps=1, log_dir=tmp_path, show_progress=False)
    with pytest.raises(ValueError, match=r"a numeric OPRO run with a different problem \(initial: .* here"):
        optimize(LinearRegression(seed=2), prompt_model=lm, num_steps=1, log_dir=tmp_path, show_progress=False)
    with pytest.raises(ValueError, match=r"different settings \(temperature: 0.5 here, 1.0 in the file\)"):
        optimize(
            LinearRegression(seed=1),
            prompt_model=lm,
            num_steps=1,
            temperature=0.5,
            log_dir=tmp_path,
            show_progress=False,
        )


def test_both_loops_write_a_call_ledger_beside_their_state(tmp_path):
    lm = scripted_lm(lambda call: "[1, 2]")
    optimize(LinearRegression(seed=1), prompt_model=lm, num_steps=1, log_dir=tmp_path / "numeric", show_progress=False)
    OPRO(
        metric,
        prompt_model=ScriptedOptimizer().lm(),
        task_model=task_lm(),
        num_steps=1,
        show_progress=False,
        log_dir=str(tmp_path / "instructions"),
    ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(4))
    for folder, ledger in (("numeric", "opro_numeric_calls.jsonl"), ("instructions", "opro_calls.jsonl")):
        events = [json.loads(line) for line in (tmp_path / folder / ledger).read_text().splitlines()]
        assert events[0]["event"] == "header" and any(e.get("role") == "prompt" for e in events[1:])


def test_counts_read_and_write_themselves_under_their_json_names():
    counts = Counts(metric_calls=3, task=CallStats(calls=2, requests=2, succeeded=2), rejected={"too_long": 1})
    data = counts.as_dict()
    assert data["task_lm"]["calls"] == 2 and data["prompt_lm"]["calls"] == 0 and data["rejected"] == {"too_long": 1}
    assert Counts.from_dict(data) == counts and Counts.from_dict({}) == Counts()
    numeric = NumericCounts(samples=4, invalid={"no pair found": 1}, lm=CallStats(calls=4))
    assert NumericCounts.from_dict(numeric.as_dict()) == numeric and numeric.stats("prompt") is numeric.lm


def test_a_checkpoint_is_replaced_whole_and_refuses_another_version(tmp_path):
    checkpoint = Checkpoint(tmp_path, name="state.json", version=3)
    assert checkpoint.read() is None
    checkpoint.write({"a": 1})
    assert checkpoint.read() == {"a": 1, "format_version": 3}
    with pytest.raises(ValueError, match=r"incompatible version \(format 3, expected 4\)"):
        Checkpoint(tmp_path, name="state.json", version=4).read()
