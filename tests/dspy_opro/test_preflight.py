"""A model that cannot work stops the run at once, before any metric call: real DSPy and litellm over real HTTP.

Each case records how long compile took to raise (a generous bound, as behaviour rather than speed)
and how many requests reached the loopback server (tests/openai_server.py's request log).
"""

import logging
import time

import dspy
import pytest
from openai_server import Fault, FaultPlan, OpenAIServer
from opro_scripted import ScriptedOptimizer, chat_reply, make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.preflight import ModelCheckError, check_models, is_checkable

PROMPTS_SEEN_BY_THE_TASK = "What is"  # task-model requests hold the question; probes and meta-prompts do not


@pytest.fixture
def server():
    def reply(request):
        if "Your job is to write the instruction" in request.text:
            return "<INS>Answer with the number only.</INS>"
        if PROMPTS_SEEN_BY_THE_TASK in request.text:
            return chat_reply({"answer": "7"})
        return "OK"

    with OpenAIServer(reply, api_key="sk-right", models=("good-model",)) as srv:
        yield srv


class CountingMetric:
    """Counts the metric calls on a model's prediction (those carry the model's completions); the set-up
    check that runs the metric once on trainset[0]'s own labels, with no model involved, is not one."""

    def __init__(self):
        self.calls = 0

    def __call__(self, example, prediction, trace=None):
        self.calls += prediction._completions is not None
        return metric(example, prediction)


def server_lm(server, model="good-model", **kwargs):
    settings = {"api_base": server.url, "api_key": "sk-right", "cache": False, **kwargs}
    return dspy.LM(f"openai/{model}", **settings)


def timed_failure(optimizer, **compile_kwargs):
    started = time.monotonic()
    with pytest.raises(ModelCheckError) as caught:
        optimizer.compile(dspy.Predict("question -> answer"), trainset=make_trainset(6), **compile_kwargs)
    return caught.value, time.monotonic() - started


def requests_for(server, model):
    return sum(1 for r in server.requests if r.body.get("model") == model)


def test_missing_key_stops_at_once_and_no_request_is_sent(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    score, optimizer = CountingMetric(), ScriptedOptimizer()
    task = dspy.LM("openai/good-model", api_base=server.url, cache=False)  # no api_key, none in the environment
    error, seconds = timed_failure(OPRO(score, prompt_model=optimizer.lm(), task_model=task))
    assert error.role == "task_model" and error.kind == "fatal"
    assert "no API key found" in str(error) and "OPENAI_API_KEY" in str(error)
    assert seconds < 10
    assert server.count() == 0 and score.calls == 0 and optimizer.prompts == []


def test_missing_key_of_a_model_string(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    score = CountingMetric()
    error, seconds = timed_failure(OPRO(score, prompt_model="openai/gpt-4o-mini", task_model=task_lm()))
    assert error.role == "prompt_model" and "OPENAI_API_KEY" in str(error)
    assert seconds < 10 and score.calls == 0


def test_missing_key_through_litellm_is_fast_too(monkeypatch):
    import litellm  # noqa: F401  (imported before the clock starts: the import alone can take seconds)

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    lm = dspy.LM("openai/gpt-4o-mini", engine="litellm", cache=False)  # litellm would retry this for seconds
    error, seconds = timed_failure(OPRO(CountingMetric(), prompt_model=lm, task_model=task_lm()))
    assert "Missing credentials" in str(error) and seconds < 10


def test_wrong_key_is_a_401_and_stops_after_one_request(server):
    score, optimizer = CountingMetric(), ScriptedOptimizer()
    task = server_lm(server, api_key="sk-wrong")
    error, seconds = timed_failure(OPRO(score, prompt_model=optimizer.lm(), task_model=task))
    assert "Incorrect API key" in str(error) and error.role == "task_model"
    assert seconds < 10
    assert server.count() == 1 and server.requests[0].status == 401
    assert score.calls == 0 and optimizer.prompts == []


def test_unknown_model_is_a_404_and_stops_after_one_request(server):
    score = CountingMetric()
    prompt = server_lm(server, model="no-such-model")
    error, seconds = timed_failure(OPRO(score, prompt_model=prompt, task_model=server_lm(server)))
    assert "does not exist" in str(error) and error.role == "prompt_model"
    assert seconds < 10
    # The task model's probe may run beside the prompt model's: at most that one request reached it.
    assert requests_for(server, "no-such-model") == 1 and requests_for(server, "good-model") <= 1
    assert not any(PROMPTS_SEEN_BY_THE_TASK in r.text for r in server.requests) and score.calls == 0


def test_unknown_model_string_fails_without_any_call():
    started = time.monotonic()
    with pytest.raises(ValueError, match="Unknown model 'nonsense-provider/x'"):
        OPRO(metric, prompt_model="nonsense-provider/x")
    assert time.monotonic() - started < 10


def test_a_working_setup_spends_one_counted_check_per_model(server):
    # One LM object serves both roles: it is checked once.
    lm, score = server_lm(server), CountingMetric()
    program = OPRO(score, prompt_model=lm, task_model=lm, num_steps=1, candidates_per_step=2).compile(
        dspy.Predict("question -> answer"), trainset=make_trainset(4)
    )
    assert score.calls == program.call_counts["metric_calls"] > 0
    checks = [r for r in server.requests if "Reply with the word OK." in r.text]
    assert len(checks) == 1 and checks[0].body.get("max_tokens", checks[0].body.get("max_completion_tokens")) == 16
    counts = program.call_counts
    assert counts["preflight"]["calls"] == 1 and counts["preflight"]["errors"] == 0
    assert counts["preflight"]["models"] == ["openai/good-model"]
    # The check's request is counted with the model's other calls (here under the prompt model, its first role).
    assert server.count() == counts["prompt_lm"]["calls"] + counts["task_lm"]["calls"]


def test_a_transient_failure_at_the_check_does_not_stop_the_run(server, caplog):
    server.plan = FaultPlan(Fault("status", status=503), first=1)
    with caplog.at_level(logging.WARNING, logger="dspy_opro"):
        program = OPRO(metric, prompt_model=server_lm(server), task_model=task_lm(), num_steps=1).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(4)
        )
    assert server.requests[0].status == 503 and "did not answer the set-up check (transient" in caplog.text
    assert program.call_counts["preflight"]["errors"] == 1 and len(program.trial_logs) == 2


def test_a_finished_run_reloads_without_any_request(server, tmp_path):
    settings = dict(prompt_model=server_lm(server), task_model=task_lm(), num_steps=1, log_dir=str(tmp_path))
    OPRO(metric, **settings).compile(dspy.Predict("question -> answer"), trainset=make_trainset(4))
    before = server.count()
    OPRO(metric, **settings).compile(dspy.Predict("question -> answer"), trainset=make_trainset(4))
    assert server.count() == before


def test_what_is_checked():
    from dspy.utils import DummyLM

    from dspy_opro.local import text_lm

    assert is_checkable(dspy.LM("openai/gpt-4o-mini")) and is_checkable(text_lm("openai/gpt-3.5-turbo-instruct"))
    assert not is_checkable(DummyLM([{"answer": "1"}])) and not is_checkable(task_lm())
    report = check_models([("prompt_model", DummyLM([{"answer": "1"}])), ("task_model", None)])
    assert report.as_dict()["calls"] == 0 and report.skipped == ["dummy"]


def test_a_local_model_whose_file_is_missing_stops_the_run(tmp_path):
    missing = tmp_path / "missing.gguf"
    score = CountingMetric()
    error, seconds = timed_failure(OPRO(score, prompt_model=ScriptedOptimizer().lm(), task_model=f"local/{missing}"))
    assert "GGUF model file not found" in str(error) and error.role == "task_model"
    assert seconds < 10 and score.calls == 0


def test_a_served_python_generator_is_not_probed():
    from dspy_opro.local import register_generator, unregister_generator

    def only_its_own_task(request):
        raise ValueError("this model answers list prompts only")

    register_generator("own-task-only", only_its_own_task)
    try:
        assert not is_checkable(dspy.LM("local/own-task-only"))
        assert check_models([("task_model", dspy.LM("local/own-task-only"))]).skipped == ["local/own-task-only"]
    finally:
        unregister_generator("own-task-only")
