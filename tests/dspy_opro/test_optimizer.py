import json
import logging
import re
import threading

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from example_scripts import TESTS
from opro_scripted import (
    ScriptedOptimizer,
    TwoStageOptimizer,
    TwoStageProgram,
    answer_for,
    chat_reply,
    instruction_of,
    make_trainset,
    metric,
    task_lm,
    two_stage_task_lm,
)

import dspy_opro
from dspy_opro import OPRO
from dspy_opro.calls import PromptModelError
from dspy_opro.scoring import MetricError, TaskFailureError
from dspy_opro.testing import scripted_lm


def opro(optimizer=None, **kwargs):
    settings = dict(
        prompt_model=(optimizer or ScriptedOptimizer()).lm(),
        task_model=task_lm(),
        num_steps=3,
        candidates_per_step=8,
        num_threads=4,
        screening=False,  # these tests pin the paper's full scoring; tests/test_screening.py covers screening
        show_progress=False,
    )
    settings.update(kwargs)
    return OPRO(metric, **settings)


def candidates(program):
    return [
        (c["instruction"], c["score"], c["step"]) for c in sorted(program.candidate_programs, key=lambda c: c["id"])
    ]


def test_finds_the_instructions_the_task_model_needs():
    student = dspy.Predict("question -> answer")
    before = student.signature.instructions
    program = opro(initial_instructions="Answer.").compile(student, trainset=make_trainset())

    instruction = program.predictors()[0].signature.instructions.lower()
    assert "number" in instruction and "only" in instruction
    assert program.score == 100.0
    # The climb needs the history: 0 at the start, 50 after one keyword, 100 after both.
    assert [t["best_score"] for t in program.trajectory[:3]] == [0.0, 50.0, 100.0]
    # The student is untouched.
    assert student.signature.instructions == before


def test_stats_are_plain_data_and_counts_add_up():
    optimizer = ScriptedOptimizer()
    train = make_trainset(10)
    program = opro(optimizer, initial_instructions="Answer.").compile(
        dspy.Predict("question -> answer"), trainset=train
    )

    assert len(program.predictors()) == 1  # stats never add modules to the program
    assert all(isinstance(c, dict) for c in program.candidate_programs)
    assert program.candidate_programs[0]["score"] == max(c["score"] for c in program.candidate_programs)
    counts = program.call_counts
    assert counts["metric_calls"] == len(program.candidate_programs) * len(train)
    assert counts["task_lm"]["calls"] == counts["metric_calls"]  # one predictor: one LM call per example
    assert counts["prompt_lm"]["calls"] == 3 * 8 == counts["proposals"]
    assert counts["task_lm"]["prompt_tokens"] > 0 and counts["prompt_lm"]["completion_tokens"] > 0
    assert len(program.trial_logs) == 4 and program.trial_logs[1]["meta_prompt"] == optimizer.prompts[0]


def test_every_sample_differs_with_the_cache_on(tmp_path, monkeypatch):
    """Independent samples at temperature 1 must not collapse into one cached reply."""
    monkeypatch.setattr(dspy, "cache", dspy.clients.cache.Cache(True, True, str(tmp_path), 10_000, 10_000))
    optimizer = ScriptedOptimizer()
    lm = scripted_lm(optimizer, model="scripted/optimizer", cache=True)
    program = opro(prompt_model=lm, num_steps=1).compile(dspy.Predict("question -> answer"), trainset=make_trainset(6))
    assert program.call_counts["duplicates"] == 0
    assert len(program.candidate_programs) == 1 + 8


@pytest.mark.parametrize("family", ["chat", "paper", "base"])
def test_every_family_reaches_the_optimizer(family):
    seen = []

    def reply(call):
        seen.append(call)
        return {"chat": "<INS>Answer with the number only.</INS>", "paper": "[Answer with the number only.]"}.get(
            family, " Answer with the number only.</TEXT>\nPrecision: 99 <TEXT>Another"
        )

    program = opro(
        prompt_model=scripted_lm(reply, model="scripted/optimizer"), meta_prompt=family, num_steps=1
    ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(6))
    assert program.predictors()[0].signature.instructions == "Answer with the number only."
    if family == "base":
        assert seen[0].stop == ("</TEXT>",)
        assert seen[0].user.endswith("<TEXT>")


def test_multi_predictor_programs_get_their_own_history_and_view():
    optimizer = TwoStageOptimizer()
    train = make_trainset(8)
    program = OPRO(
        metric,
        prompt_model=optimizer.lm(),
        task_model=two_stage_task_lm(),
        num_steps=4,
        candidates_per_step=4,
        num_threads=4,
        initial_instructions="Do it.",
        show_progress=False,
    ).compile(TwoStageProgram(), trainset=train)

    assert "list" in program.extract.signature.instructions.lower()
    assert "add" in program.add.signature.instructions.lower()
    assert program.score == 100.0
    steps = program.trial_logs[1:]
    assert [s["predictor"] for s in steps] == ["extract", "add", "extract", "add"]
    # Coordinate ascent: each step scores only its own new candidates, nothing is re-scored.
    assert program.call_counts["metric_calls"] == len(program.candidate_programs) * len(train)
    # The second predictor's meta-prompt shows the examples as that predictor sees them,
    # including the intermediate `numbers` produced by the first predictor.
    add_prompt = steps[1]["meta_prompt"]
    assert "numbers: " in add_prompt and "question: What is" in add_prompt
    assert "numbers: " not in steps[0]["meta_prompt"]
    # Each predictor's history shows only its own instructions.
    assert "Do it list." in steps[2]["meta_prompt"]
    assert "Do it list." not in steps[1]["meta_prompt"].split("Below are some problems")[0]


def test_budget_is_a_hard_stop_and_returns_the_best_so_far():
    train = make_trainset(10)
    program = opro(max_metric_calls=35, num_steps=10, initial_instructions="Answer.").compile(
        dspy.Predict("question -> answer"), trainset=train
    )
    assert program.call_counts["metric_calls"] <= 35
    assert program.call_counts["metric_calls"] == 30  # 10 initial + 2 of 8 candidates at step 1
    assert program.score == max(c["score"] for c in program.candidate_programs)
    assert len(program.trial_logs) == 2


def test_budget_counts_validation(tmp_path):
    train, val = make_trainset(10), make_trainset(5, offset=50)
    program = opro(max_metric_calls=60, num_steps=10, num_final_candidates=2).compile(
        dspy.Predict("question -> answer"), trainset=train, valset=val
    )
    assert program.call_counts["metric_calls"] <= 60
    assert program.candidate_programs[0]["val_score"] is not None


def test_budget_too_small_for_the_initial_instructions_fails_before_any_call():
    optimizer = ScriptedOptimizer()
    with pytest.raises(ValueError, match="max_metric_calls=5 cannot cover"):
        opro(optimizer, max_metric_calls=5).compile(dspy.Predict("question -> answer"), trainset=make_trainset(10))
    assert optimizer.prompts == []


def test_valset_chooses_among_the_top_candidates():
    # On the training set the "number" keyword is enough for half the questions; on this
    # validation set (only odd A) only "only" helps, so validation decides differently.
    train = make_trainset(10)
    val = [e for e in make_trainset(20, offset=100) if int(e.question.split()[2]) % 2 == 1][:6]
    program = opro(num_steps=1, num_final_candidates=8, initial_instructions="Answer.").compile(
        dspy.Predict("question -> answer"), trainset=train, valset=val
    )
    chosen = program.candidate_programs[0]
    assert chosen["val_score"] == 100.0 and "only" in chosen["instruction"].lower()
    validated = [c for c in program.candidate_programs if c["val_score"] is not None]
    assert len(validated) == 8 and program.score == 100.0


def test_the_start_is_always_validated_and_kept_when_nothing_beats_it_there():
    # Training questions have even A (they need "number"), validation questions odd A (they need "only").
    # The start, "Answer only.", scores 0 on training and 100 on validation; every proposal says "number"
    # but not "only": 100 on training, 0 on validation. With three finalist places the proposals fill the
    # top of the training ranking, yet one place goes to the start, which then wins on validation.
    train = [e for e in make_trainset(20) if int(e.question.split()[2]) % 2 == 0]
    val = [e for e in make_trainset(12, offset=100) if int(e.question.split()[2]) % 2 == 1]
    words = iter(["now", "please", "clearly", "exactly", "briefly", "carefully", "today", "again"])
    lock = threading.Lock()

    def propose(call):
        with lock:
            return f"<INS>Give the number {next(words)}.</INS>"

    program = opro(
        prompt_model=scripted_lm(propose, model="scripted/optimizer"),
        num_steps=1,
        num_final_candidates=3,
        initial_instructions="Answer only.",
    ).compile(dspy.Predict("question -> answer"), trainset=train, valset=val)
    chosen = program.candidate_programs[0]
    assert chosen["instruction"] == "Answer only." and chosen["val_score"] == 100.0
    validated = sorted(
        (c["step"], c["score"], c["val_score"]) for c in program.candidate_programs if c["val_score"] is not None
    )
    assert validated == [(0, 0.0, 100.0), (1, 100.0, 0.0), (1, 100.0, 0.0)]


def test_resume_after_interruption_gives_the_same_history(tmp_path):
    student, train = dspy.Predict("question -> answer"), make_trainset(8)
    kwargs = dict(num_steps=4, num_threads=1, initial_instructions="Answer.")

    full = opro(ScriptedOptimizer(), log_dir=str(tmp_path / "full"), **kwargs).compile(student, trainset=train)

    interrupted = ScriptedOptimizer(stop_at_step=3)
    with pytest.raises(KeyboardInterrupt):
        opro(interrupted, log_dir=str(tmp_path / "resumed"), **kwargs).compile(student, trainset=train)
    saved = json.loads((tmp_path / "resumed" / "opro_history.json").read_text())
    assert [s["step"] for s in saved["steps"]] == [0, 1, 2]

    resumed_optimizer = ScriptedOptimizer()
    resumed = opro(resumed_optimizer, log_dir=str(tmp_path / "resumed"), **kwargs).compile(student, trainset=train)
    assert len(resumed_optimizer.prompts) == 2  # only steps 3 and 4 were asked again
    assert candidates(resumed) == candidates(full)
    assert resumed.trial_logs == full.trial_logs


def test_finished_run_is_reloaded_without_calls_and_can_be_extended(tmp_path):
    student, train = dspy.Predict("question -> answer"), make_trainset(8)
    log_dir = str(tmp_path / "run")
    first = opro(log_dir=log_dir, num_steps=2).compile(student, trainset=train)

    again = ScriptedOptimizer()
    second = opro(again, log_dir=log_dir, num_steps=2).compile(student, trainset=train)
    assert again.prompts == [] and candidates(second) == candidates(first)

    more = ScriptedOptimizer()
    third = opro(more, log_dir=log_dir, num_steps=3).compile(student, trainset=train)
    assert len(more.prompts) == 1 and len(third.trial_logs) == 4


def test_resume_refuses_a_different_program_or_dataset(tmp_path):
    log_dir = str(tmp_path / "run")
    opro(log_dir=log_dir, num_steps=1).compile(dspy.Predict("question -> answer"), trainset=make_trainset(8))
    with pytest.raises(ValueError, match="different trainset"):
        opro(log_dir=log_dir, num_steps=1).compile(dspy.Predict("question -> answer"), trainset=make_trainset(9))
    with pytest.raises(ValueError, match="different program"):
        opro(log_dir=log_dir, num_steps=1).compile(dspy.Predict("question -> result"), trainset=make_trainset(8))


def test_history_file_is_json_and_holds_no_secret(tmp_path, caplog):
    # A real litellm model with a key; there is no network here, so every proposal fails: the run stops
    # with an error after saving, and neither the file, the logs nor the error show the key.
    secret = "sk-test-DO-NOT-LEAK-1234"
    prompt_model = dspy.LM("openai/gpt-4o-mini", api_key=secret, num_retries=0, engine="litellm")
    with caplog.at_level(logging.DEBUG, logger="dspy_opro"), pytest.raises(PromptModelError) as stopped:
        opro(prompt_model=prompt_model, log_dir=str(tmp_path), num_steps=1, candidates_per_step=2).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(6)
        )
    assert "prompt model 'openai/gpt-4o-mini' is unavailable" in str(stopped.value)
    text = (tmp_path / "opro_history.json").read_text()
    data = json.loads(text)
    assert data["counts"]["prompt_lm"]["errors"] == 1 + 2  # the set-up check's request, then the two samples
    assert data["pending"]["step"] == 1 and data["pending"]["replies"] == [None, None]
    assert {"candidates", "steps", "counts", "fingerprint"} <= set(data)
    assert all({"instruction", "score", "step", "predictor"} <= set(c) for c in data["candidates"])
    assert secret not in text and secret not in caplog.text and secret not in str(stopped.value)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_faults_in_both_models_are_counted_and_the_run_goes_on():
    # Both models fail transiently: the prompt model on every third call of each meta-prompt, the task model on
    # the first call of every (instruction, question) pair with A a multiple of 3. Retries recover every call,
    # so no example is ever scored as wrong for a failure.
    failed_once, lock = set(), threading.Lock()

    def flaky(call):
        question = re.search(r"What is \d+ plus \d+\?", call.user).group(0)
        with lock:
            first = (call.system, question) not in failed_once
            failed_once.add((call.system, question))
        if int(question.split()[2]) % 3 == 0 and first:
            raise RuntimeError("scripted provider outage")
        return chat_reply({"answer": answer_for(question, instruction_of(call))})

    optimizer = ScriptedOptimizer(fail_every=3, garbage_every=4)
    program = opro(
        optimizer, task_model=scripted_lm(flaky, model="scripted/task"), max_errors=100, num_steps=3
    ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(12))
    counts = program.call_counts
    assert counts["prompt_lm"]["errors"] == 3 * 3  # 8 replies take calls 0-10 of each prompt; 2, 5 and 8 fail
    assert 0 < counts["prompt_lm"]["retries"] <= counts["prompt_lm"]["errors"]
    assert counts["unparsed"] > 0
    assert counts["task_lm"]["errors"] == counts["task_lm"]["retries"] == 4 * len(program.candidate_programs)
    assert counts["task_failures"] == 0
    train = make_trainset(12)
    for candidate in program.candidate_programs:  # every score is the instruction's true score
        right = [answer_for(e.question, candidate["instruction"]) == e.answer for e in train]
        assert candidate["score"] == pytest.approx(100 * sum(right) / 12) and candidate["failures"] == 0


def test_too_many_task_failures_stop_with_a_clear_error_after_saving(tmp_path):
    with pytest.raises(TaskFailureError, match="more than max_errors=2.*scripted provider outage"):
        opro(task_model=task_lm(fail_every=2), max_errors=2, log_dir=str(tmp_path)).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(10)
        )


def test_a_prompt_model_that_always_fails_ends_the_run_early(tmp_path):
    def broken(call):
        raise ConnectionError("no route to host")

    with pytest.raises(PromptModelError, match="prompt model 'scripted/optimizer' is unavailable.*no route to host"):
        opro(prompt_model=scripted_lm(broken, model="scripted/optimizer"), num_steps=10, log_dir=str(tmp_path)).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(6)
        )
    saved = json.loads((tmp_path / "opro_history.json").read_text())
    assert [s["step"] for s in saved["steps"]] == [0]  # the failed step is not saved as done
    assert saved["counts"]["prompt_lm"]["errors"] == 8 * (1 + 3)  # each sample and its 3 retries


def test_threads_give_the_same_result_as_one_thread():
    def run(threads):
        return opro(num_threads=threads, num_steps=3, initial_instructions="Answer.").compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(12)
        )

    one, many = run(1), run(8)
    assert sorted(candidates(one)) == sorted(candidates(many))
    assert one.call_counts == many.call_counts


def test_compile_callbacks_fire():
    events = []

    class Recorder(BaseCallback):
        def on_compile_start(self, call_id, instance, inputs):
            events.append(("start", type(instance).__name__))

        def on_compile_end(self, call_id, outputs, exception=None):
            events.append(("end", exception))

    with dspy.context(callbacks=[Recorder()]):
        opro(num_steps=1).compile(dspy.Predict("question -> answer"), trainset=make_trainset(5))
    assert events == [("start", "OPRO"), ("end", None)]


def test_models_default_to_the_configured_lm():
    optimizer = ScriptedOptimizer()
    with dspy.context(lm=task_lm()):
        OPRO(metric, prompt_model=optimizer.lm(), num_steps=1, show_progress=False).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(5)
        )
    assert len(optimizer.prompts) == 1


def test_register_exposes_opro_on_dspy():
    dspy_opro.register()
    dspy_opro.register()
    assert dspy.OPRO is OPRO and dspy.teleprompt.OPRO is OPRO


class Empty(dspy.Module):
    def forward(self, question):
        return dspy.Prediction(answer="1")


@pytest.mark.parametrize(
    "student, trainset, error, match",
    [
        (dspy.Predict("question -> answer"), [], ValueError, "trainset has 0 example"),
        (dspy.Predict("question -> answer"), [{"question": "q"}] * 5, TypeError, r"trainset\[0\] is a dict"),
        (dspy.Predict("question -> answer"), [dspy.Example(question="q")] * 5, ValueError, "with_inputs"),
        (Empty(), make_trainset(5), ValueError, "no predictors"),
        ("not a program", make_trainset(5), TypeError, "dspy.Module"),
    ],
)
def test_bad_input_fails_before_any_lm_call(student, trainset, error, match):
    optimizer = ScriptedOptimizer()
    with pytest.raises(error, match=match):
        opro(optimizer).compile(student, trainset=trainset)
    assert optimizer.prompts == []


def test_metric_returning_a_non_number_fails_before_any_lm_call():
    optimizer = ScriptedOptimizer()
    with pytest.raises(MetricError, match="must return a bool, a number"):
        OPRO(lambda ex, pred: "yes", prompt_model=optimizer.lm(), task_model=task_lm()).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(5)
        )
    assert optimizer.prompts == []


def test_metric_that_raises_is_reported_with_max_errors():
    def broken_metric(example, prediction):
        raise KeyError("missing_field")

    with pytest.raises(TaskFailureError, match="the metric raised KeyError"):
        OPRO(broken_metric, prompt_model=ScriptedOptimizer().lm(), task_model=task_lm(), max_errors=0).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(5)
        )


def test_unknown_model_string_and_missing_lm():
    with pytest.raises(ValueError, match="Unknown model 'nonsense-provider/x'"):
        OPRO(metric, prompt_model="nonsense-provider/x")
    with pytest.raises(TypeError, match="prompt_model must be a dspy.LM or a litellm model string"):
        OPRO(metric, prompt_model=42)
    with dspy.context(lm=None), pytest.raises(ValueError, match="no prompt model"):
        OPRO(metric).compile(dspy.Predict("question -> answer"), trainset=make_trainset(5))


def test_model_strings_become_dspy_lms_with_a_finite_timeout():
    # DSPy's default engine ("auto"): its native clients fail at once on a missing key, litellm serves the rest.
    optimizer = OPRO(metric, prompt_model="openai/gpt-4o-mini", task_model="ollama_chat/llama3")
    assert isinstance(optimizer.prompt_model, dspy.LM) and optimizer.prompt_model.engine == "auto"
    assert optimizer.prompt_model.kwargs["timeout"] == optimizer.task_model.kwargs["timeout"] < 6000
    assert optimizer.task_model.model == "ollama_chat/llama3"
    assert optimizer.get_params()["prompt_model"] is optimizer.prompt_model


def test_unwritable_log_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    optimizer = ScriptedOptimizer()
    with pytest.raises(ValueError, match="is not writable"):
        opro(optimizer, log_dir=str(blocker / "run")).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(5)
        )
    assert optimizer.prompts == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"meta_prompt": "gpt"}, ValueError, "meta_prompt must be one of"),
        ({"exemplar_selection": "best"}, ValueError, "exemplar_selection must be one of"),
        ({"candidates_per_step": 0}, ValueError, "candidates_per_step must be at least 1"),
        ({"num_steps": 2.5}, TypeError, "num_steps must be an integer"),
        ({"temperature": 3}, ValueError, "temperature must be a number in"),
        ({"max_metric_calls": 0}, ValueError, "max_metric_calls must be at least 1"),
    ],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        OPRO(metric, **kwargs)


def test_initial_instructions_for_unknown_predictor():
    with pytest.raises(ValueError, match="unknown predictors"):
        opro(initial_instructions={"nope": "x"}).compile(dspy.Predict("question -> answer"), trainset=make_trainset(5))


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import dspy
from opro_scripted import ScriptedOptimizer, make_trainset, metric, task_lm
from dspy_opro import OPRO
OPRO(metric, prompt_model=ScriptedOptimizer().lm(), task_model=task_lm(delay=0.02), num_steps=50,
     num_threads=1, initial_instructions="Answer.", log_dir={log_dir!r}, screening=False, show_progress=False
).compile(dspy.Predict("question -> answer"), trainset=make_trainset(8))
"""


def test_kill_9_loses_at_most_the_step_in_flight(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    log_dir = tmp_path / "run"
    history = log_dir / "opro_history.json"
    code = CHILD.format(tests=str(TESTS), log_dir=str(log_dir))
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if history.exists() and len(json.loads(history.read_text())["steps"]) >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the child run never reached step 2")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    saved = json.loads(history.read_text())  # whatever moment the kill hit, the file is whole
    done = len(saved["steps"]) - 1
    assert done >= 2

    kwargs = dict(num_steps=done + 2, num_threads=1, initial_instructions="Answer.")
    resumed = opro(log_dir=str(log_dir), **kwargs).compile(
        dspy.Predict("question -> answer"), trainset=make_trainset(8)
    )
    full = opro(**kwargs).compile(dspy.Predict("question -> answer"), trainset=make_trainset(8))
    assert candidates(resumed) == candidates(full)


def test_validation_takes_at_most_a_quarter_of_the_budget():
    train, val = make_trainset(10), make_trainset(10, offset=50)
    program = opro(max_metric_calls=100, num_steps=10, num_final_candidates=5).compile(
        dspy.Predict("question -> answer"), trainset=train, valset=val
    )
    validated = [c for c in program.candidate_programs if c["val_score"] is not None]
    assert len(validated) == 2  # 100 // 4 // 10 finalists instead of 5
    assert program.call_counts["metric_calls"] <= 100
    assert len([c for c in program.candidate_programs if c["step"] > 0]) >= 5  # the rest went to the search


def test_the_former_name_of_max_shown_still_works_with_a_warning():
    with pytest.deprecated_call(match="max_instructions_in_prompt is deprecated; use max_shown"):
        optimizer = OPRO(metric, prompt_model=ScriptedOptimizer().lm(), max_instructions_in_prompt=5)
    params = optimizer.get_params()
    assert optimizer.max_shown == params["max_shown"] == 5 and "max_instructions_in_prompt" not in params
    with pytest.raises(ValueError, match="max_shown must be at least 1"):
        OPRO(metric, prompt_model=ScriptedOptimizer().lm(), max_shown=0)
