"""The loopback OpenAI-compatible server the fault tests rely on, exercised through real litellm over HTTP."""

import time

import dspy
import litellm
import pytest
from openai_server import Fault, FaultPlan, OpenAIServer


@pytest.fixture
def server():
    with OpenAIServer(lambda request: f"echo: {request.text[-20:]}", api_key="sk-right") as srv:
        yield srv


def _call(server, **kwargs):
    return litellm.completion(
        model="openai/test-model",
        api_base=server.url,
        api_key=kwargs.pop("api_key", "sk-right"),
        messages=[{"role": "user", "content": "hello there"}],
        num_retries=0,
        **kwargs,
    )


def test_answers_chat_completions_with_usage_and_logs_the_request(server):
    response = _call(server)
    assert response.choices[0].message.content == "echo: hello there"
    assert response.usage.prompt_tokens == 2
    assert server.count() == 1 and server.count(succeeded=True) == 1
    assert server.requests[0].body["model"] == "test-model"
    assert server.requests[0].api_key == "sk-right"


def test_wrong_key_is_a_401_that_litellm_reports_as_authentication_error(server):
    with pytest.raises(litellm.AuthenticationError):
        _call(server, api_key="sk-wrong")
    assert server.requests[0].status == 401


def test_status_faults_follow_the_plan_and_carry_retry_after(server):
    server.plan = FaultPlan(Fault("status", status=429, retry_after=0.1), first=1)
    with pytest.raises(litellm.RateLimitError):
        _call(server)
    assert _call(server).choices[0].message.content.startswith("echo")
    assert [r.status for r in server.requests] == [429, 200]
    assert server.count(succeeded=False) == 1


def test_outage_switch_and_every_kth(server):
    plan = FaultPlan(Fault("status", status=503), every=3)
    server.plan = plan
    statuses = []
    for _ in range(6):
        try:
            _call(server)
            statuses.append(200)
        except litellm.ServiceUnavailableError:
            statuses.append(503)
    assert statuses == [200, 200, 503, 200, 200, 503]
    plan.down = True
    with pytest.raises(litellm.ServiceUnavailableError):
        _call(server)


def test_reset_malformed_and_empty_replies_fail_or_come_back_empty(server):
    server.plan = FaultPlan(Fault("reset"), first=1)
    with pytest.raises(litellm.InternalServerError, match="Connection error"):
        _call(server)
    server.plan = FaultPlan(Fault("malformed"), first=1)
    with pytest.raises(litellm.InternalServerError, match="Expecting value"):
        _call(server)
    server.plan = FaultPlan(Fault("empty"), first=1)
    assert not _call(server).choices[0].message.content


def test_a_stall_past_the_client_timeout_is_a_timeout_and_stop_does_not_hang(server):
    server.plan = FaultPlan(Fault("stall", seconds=30), first=1)
    started = time.monotonic()
    with pytest.raises(litellm.Timeout):
        _call(server, timeout=0.5)
    assert time.monotonic() - started < 5
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5


def test_dspy_lm_reaches_it_through_litellm(server):
    lm = dspy.LM(**server.lm_kwargs(api_key="sk-right"), cache=False, num_retries=0)
    assert lm("hi")[0] == "echo: hi"
    assert server.count(succeeded=True) == 1


def test_a_reply_is_made_only_for_what_is_sent_and_a_client_that_gave_up_gets_none():
    made = []

    def reply(request):
        made.append(request.index)
        return "made"

    with OpenAIServer(reply) as srv:
        srv.plan = FaultPlan(Fault("malformed"), first=1)
        with pytest.raises(litellm.InternalServerError):
            _call(srv, api_key="k")
        srv.plan = FaultPlan(Fault("stall", seconds=1.0), first=1)
        with pytest.raises(litellm.Timeout):
            _call(srv, api_key="k", timeout=0.3)
        time.sleep(1.2)  # the stalled handler wakes up and finds the client gone
        assert _call(srv, api_key="k").choices[0].message.content == "made"
        malformed, stalled, answered = srv.requests
    assert made == [answered.index]
    assert not stalled.delivered and stalled.prompt_tokens == 2 and not stalled.succeeded
    assert malformed.delivered and not malformed.succeeded and answered.succeeded
    assert stalled.received < answered.received
