"""Asking the prompt model under OPRO's call policy: retried and counted, a clear stop when it cannot answer."""

import threading

import pytest
from dspy.utils.exceptions import LMAuthError

from dspy_opro.calls import PromptModelError, without_retries
from dspy_opro.counting import CallCounter
from dspy_opro.sampling import ask, rollout_id
from dspy_opro.testing import scripted_lm


def asked(reply, samples=range(4), retries=2, **kwargs):
    counter = CallCounter(role="prompt")
    lm = without_retries(scripted_lm(reply))
    outcomes = ask(
        lm,
        "prompt",
        samples,
        temperature=1.0,
        key=("k",),
        retries=retries,
        model="scripted/lm",
        step=3,
        total=4,
        counter=counter,
        **kwargs,
    )
    return outcomes, counter.stats


def test_every_sample_has_its_own_reply_and_rollout_id():
    outcomes, stats = asked(lambda call: "reply")
    assert [o.value for o in outcomes] == ["reply"] * 4 and stats.calls == 4
    assert len({rollout_id("k", j) for j in range(4)}) == 4 and rollout_id("k", 0) == rollout_id("k", 0)


def test_a_transient_failure_is_retried_and_every_request_counted():
    lock, seen = threading.Lock(), []

    def flaky(call):
        with lock:
            seen.append(1)
            first = len(seen) == 1
        if first:
            raise ConnectionError("reset")
        return "ok"

    outcomes, stats = asked(flaky, num_threads=1)
    assert all(o.ok for o in outcomes) and len(outcomes[0].failures) == 1  # the failed request is kept on record
    assert (stats.calls, stats.errors, stats.retries) == (5, 1, 1)


def test_a_failure_retrying_cannot_fix_stops_at_once_with_what_came():
    def unauthorized(call):
        raise LMAuthError("Incorrect API key provided.", model="scripted/lm")

    with pytest.raises(PromptModelError, match="'scripted/lm' failed with an error that retrying cannot fix") as stop:
        asked(unauthorized, num_threads=1)
    assert stop.value.kind == "fatal" and sum(o is not None for o in stop.value.partial) == 1


def test_a_round_in_which_every_call_failed_means_the_model_is_down():
    def down(call):
        raise ConnectionError("no route to host")

    with pytest.raises(
        PromptModelError, match=r"unavailable: all 4 calls of the last round failed, each after 2 retries"
    ):
        asked(down)


def test_a_sample_that_still_failed_in_a_round_that_partly_worked_comes_back_without_a_reply():
    calls = []

    def first_fails(call):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("reset")
        return "ok"

    outcomes, stats = asked(first_fails, samples=[0, 1], retries=0, num_threads=1)
    assert [o.ok for o in outcomes] == [False, True] and outcomes[0].value is None
    assert stats.errors == 1 and stats.retries == 0  # the caller asks for it again in its next round
