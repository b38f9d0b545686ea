"""Classifying real provider failures: errors raised by DSPy and litellm against the loopback server."""

import dspy
import litellm
import pytest
from dspy.utils.exceptions import AdapterParseError
from openai_server import Fault, FaultPlan, OpenAIServer

from dspy_opro.faults import FATAL, OUTPUT, PROGRAM, TRANSIENT, classify, describe, retry_after


@pytest.fixture
def server():
    with OpenAIServer(api_key="sk-right", models=("good-model",)) as srv:
        yield srv


def _dspy_error(server, *, model="good-model", api_key="sk-right", **kwargs):
    lm = dspy.LM(**server.lm_kwargs(model, api_key=api_key), cache=False, num_retries=0, **kwargs)
    with pytest.raises(Exception) as caught:
        lm("hello")
    return caught.value


def _litellm_error(server, **kwargs):
    with pytest.raises(Exception) as caught:
        litellm.completion(
            model="openai/good-model",
            api_base=server.url,
            api_key="sk-right",
            messages=[{"role": "user", "content": "hello"}],
            num_retries=0,
            **kwargs,
        )
    return caught.value


@pytest.mark.parametrize(
    "fault, kind",
    [
        (Fault("status", status=400), FATAL),
        (Fault("status", status=403), FATAL),
        (Fault("status", status=429), TRANSIENT),
        (Fault("status", status=429, message="You exceeded your current quota (insufficient_quota)"), FATAL),
        (Fault("status", status=500), TRANSIENT),
        (Fault("status", status=503), TRANSIENT),
        (Fault("reset"), TRANSIENT),
        (Fault("malformed"), TRANSIENT),
    ],
)
def test_faults_through_dspy_and_through_litellm_get_the_same_kind(server, fault, kind):
    server.plan = FaultPlan(fault, first=2)
    assert classify(_dspy_error(server)) == kind
    assert classify(_litellm_error(server)) == kind


def test_wrong_key_and_unknown_model_are_fatal(server):
    assert classify(_dspy_error(server, api_key="sk-wrong")) == FATAL
    assert classify(_dspy_error(server, model="no-such-model")) == FATAL


def test_a_timeout_is_transient(server):
    server.plan = FaultPlan(Fault("stall", seconds=10), first=1)
    assert classify(_dspy_error(server, timeout=0.3)) == TRANSIENT


def test_a_missing_key_is_fatal_whichever_engine_reports_it(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for engine in ("litellm", "auto"):
        lm = dspy.LM("openai/gpt-4o-mini", engine=engine, cache=False, num_retries=0)
        with pytest.raises(Exception) as caught:
            lm("hello")
        assert classify(caught.value) == FATAL, (engine, describe(caught.value))


def test_retry_after_is_read_from_the_response(server):
    server.plan = FaultPlan(Fault("status", status=429, retry_after=7), first=1)
    assert retry_after(_litellm_error(server)) == 7.0
    server.plan = FaultPlan(Fault("status", status=429, retry_after=3), first=1)
    assert retry_after(_dspy_error(server)) == 3.0
    assert retry_after(ValueError("x")) is None


def test_unreadable_output_and_user_bugs():
    parse = AdapterParseError(adapter_name="ChatAdapter", signature=dspy.Signature("q -> a"), lm_response="???")
    assert classify(parse) == OUTPUT
    assert classify(KeyError("answer")) == PROGRAM
    assert classify(TimeoutError()) == TRANSIENT
    assert describe(ValueError("bad\n  thing")) == "ValueError: bad thing"
