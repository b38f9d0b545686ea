"""OPRO under provider faults, over real HTTP through litellm to the loopback server (127.0.0.1).

Each scenario checks the contract of `dspy_opro.calls`: a run either returns what a run without
faults returns, or stops with a clear error after saving everything that succeeded; the rerun
with the same log_dir sends no request for work that succeeded and reaches the same result; the
reported counts are the server's. DSPy's cache is off unless a test says otherwise, so that the
server's log is the whole truth.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import dspy
import http_task
import pytest
from example_scripts import TESTS
from http_task import is_probe, is_prompt, make_opro, make_set, outcome
from openai_server import Fault, FaultPlan

from dspy_opro.calls import PromptModelError, RunStoppedError, TaskFailureError

TRAIN, VAL = make_set(9), make_set(4, offset=40)
FAST = dict(retries=1, max_errors=3)  # a dead server is given up on after few requests


DOWN = Fault("status", status=503)


class Outage:
    """From the ``after``-th request on, every request fails with ``fault`` until `end` is called."""

    def __init__(self, after: int, fault: Fault = DOWN):
        self.after, self.fault = after, fault
        self.seen, self.on = 0, True
        self._lock = threading.Lock()

    def __call__(self, request):
        if is_probe(request):  # the set-up check before each compile is not part of the run's work
            return None
        with self._lock:
            self.seen += 1
            hit = self.on and self.seen > self.after
        return self.fault if hit else None

    def end(self):
        self.on = False


def answered(requests) -> Counter:
    """The requests answered: task calls by (instruction, question); prompt calls all as "prompt"."""
    keys = Counter()
    for r in requests:
        if r.succeeded and not is_probe(r):
            keys["prompt" if is_prompt(r) else (http_task.instruction_of(r), http_task.question_of(r))] += 1
    return keys


@pytest.fixture(scope="module")
def baseline():
    """The run without faults: its outcome and what the server answered."""
    with http_task.server() as server:
        program = make_opro(server.url, **FAST).compile(dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL)
        log = [r for r in server.requests if not is_probe(r)]  # the run's own requests, as `Outage` counts them
    first_prompt = next(i for i, r in enumerate(log) if is_prompt(r))
    return {
        "outcome": outcome(program),
        "answered": answered(log),
        "requests": len(log),
        "first_prompt": first_prompt,
        "counts": program.call_counts,
    }


def test_the_baseline_climbs_and_validates(baseline):
    assert baseline["outcome"]["chosen"] == ("Answer number only.", 100.0, 100.0)
    assert baseline["outcome"]["best_per_step"] == [0.0, 200 / 3, 100.0]
    assert baseline["counts"]["task_lm"]["errors"] == 0 and baseline["answered"]["prompt"] == 2 * 3


@pytest.mark.parametrize("where", ["initial scoring", "proposing", "screening", "validation"])
def test_an_outage_stops_the_run_and_the_rerun_redoes_only_what_failed(baseline, tmp_path, where):
    after = {
        "initial scoring": 5,
        "proposing": baseline["first_prompt"] + 2,  # two of step 1's three samples answered, one not
        "screening": baseline["first_prompt"] + 3 + 10,
        "validation": baseline["requests"] - 3,  # the last requests are the two finalists on the valset
    }[where]
    plan = Outage(after)
    with http_task.server() as server:
        server.plan = plan
        with pytest.raises(RunStoppedError) as stopped:
            make_opro(server.url, log_dir=str(tmp_path), **FAST).compile(
                dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL
            )
        error = stopped.value
        expected = (
            (PromptModelError, "openai/prompt-model")
            if where == "proposing"
            else (TaskFailureError, "openai/task-model")
        )
        assert isinstance(error, expected[0]) and repr(expected[1]) in str(error)
        assert "injected fault" in str(error) and error.saved_to == str(tmp_path / "opro_history.json")
        saved = json.loads((tmp_path / "opro_history.json").read_text())
        if where == "validation":  # every step done; the validation plan and its partial results kept
            assert saved["pending"] is None and saved["selection"]["validating"]
        else:
            assert saved["pending"]["step"] == (0 if where == "initial scoring" else 1)
        first_run = len(server.requests)

        plan.end()
        program = make_opro(server.url, log_dir=str(tmp_path), **FAST).compile(
            dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL
        )
        assert outcome(program) == baseline["outcome"]
        # Nothing answered in the first run was asked again: together the runs got exactly the baseline's answers.
        first, second = answered(server.requests[:first_run]), answered(server.requests[first_run:])
        assert not (set(first) & set(second)) - {"prompt"}
        assert first + second == baseline["answered"]
        counts = program.call_counts
        assert counts["task_lm"]["requests"] + counts["prompt_lm"]["requests"] == len(server.requests)
        assert counts["task_lm"]["succeeded"] + counts["prompt_lm"]["succeeded"] == server.count(succeeded=True)


QUOTA = Fault(
    "status", status=429, message="You exceeded your current quota, please check your plan and billing details."
)


@pytest.mark.parametrize(
    "fault",
    [Fault("status", status=s) for s in (401, 403, 404, 400)] + [QUOTA],
    ids=["401", "403", "404", "400", "quota"],
)
def test_an_error_retrying_cannot_fix_stops_the_run_at_once_after_saving(tmp_path, fault):
    with http_task.server() as server:
        server.plan = Outage(3, fault)
        with pytest.raises(TaskFailureError, match="task model 'openai/task-model' failed with an error that retrying"):
            make_opro(server.url, log_dir=str(tmp_path)).compile(dspy.Predict("question -> answer"), trainset=TRAIN)
        # At once: the failing request, and at most the three others already in flight; none was retried.
        assert server.count(succeeded=False) <= 4 and sum(not is_probe(r) for r in server.requests) <= 3 + 4
    pending = json.loads((tmp_path / "opro_history.json").read_text())["pending"]
    assert pending["step"] == 0 and sum(s is not None for s in pending["evaluations"][0]["scores"]) >= 3


def test_after_a_quota_runs_out_the_resumed_run_is_the_run_that_never_stopped(baseline, tmp_path):
    plan = Outage(baseline["first_prompt"] + 6, QUOTA)
    with http_task.server() as server:
        server.plan = plan
        with pytest.raises(TaskFailureError, match="quota"):
            make_opro(server.url, log_dir=str(tmp_path), **FAST).compile(
                dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL
            )
        plan.end()  # the quota is topped up
        program = make_opro(server.url, log_dir=str(tmp_path), **FAST).compile(
            dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL
        )
    assert outcome(program) == baseline["outcome"]
    assert answered(server.requests) == baseline["answered"]


class Mixed:
    """A share of the requests fails, cycling through every kind of fault."""

    FAULTS = [
        Fault("status", status=429, retry_after=0.01),
        Fault("status", status=500),
        Fault("status", status=503),
        Fault("reset"),
        Fault("malformed"),
        Fault("stall", seconds=0.8),  # past the client's 0.4 s timeout
        Fault("empty"),
    ]

    def __init__(self, share: float, seed: int = 0):
        self.plan = FaultPlan(Fault("status"), share=share, seed=seed)
        self.k = 0
        self._lock = threading.Lock()

    def __call__(self, request):
        if self.plan(request) is None:
            return None
        with self._lock:
            self.k += 1
            return self.FAULTS[self.k % len(self.FAULTS)]


def test_call_counts_are_what_the_server_saw(tmp_path):
    with http_task.server() as server:
        server.plan = Mixed(share=0.3, seed=2)
        try:
            program = make_opro(server.url, log_dir=str(tmp_path), retries=3, timeout=0.4).compile(
                dspy.Predict("question -> answer"), trainset=TRAIN
            )
            counts = program.call_counts
        except RunStoppedError:  # a rare whole-round failure: the counts are then the saved ones
            counts = json.loads((tmp_path / "opro_history.json").read_text())["counts"]
        log = list(server.requests)
    kinds = Counter(r.fault.kind if r.fault else "none" for r in log)
    assert all(kinds[k] for k in ("status", "reset", "malformed", "stall", "empty"))  # every kind was injected
    for role, model in (("task_lm", http_task.TASK_MODEL), ("prompt_lm", http_task.PROMPT_MODEL)):
        seen = [r for r in log if r.body.get("model") == model]
        answered_ = [r for r in seen if r.succeeded]
        mine = counts[role]
        assert mine["requests"] == len(seen) and mine["calls"] == len(seen) and mine["cache_hits"] == 0
        assert mine["succeeded"] == len(answered_) and mine["errors"] == len(seen) - len(answered_)
        assert mine["failed"] == ({"transient": mine["errors"]} if mine["errors"] else {})
        assert mine["error_types"].get("LMRateLimitError", 0) == sum(r.status == 429 for r in seen)
        assert mine["error_types"].get("LMTimeoutError", 0) == sum(
            r.fault is not None and r.fault.kind == "stall" and not r.delivered for r in seen
        )
        assert mine["prompt_tokens"] == sum(r.prompt_tokens for r in answered_)
        assert mine["completion_tokens"] == sum(r.completion_tokens for r in answered_)
        assert mine["retries"] <= mine["errors"]
    # A request that timed out reports no usage to the client; the provider may still bill its prompt.
    assert sum(r.prompt_tokens for r in log if not r.delivered) > 0


def test_with_the_cache_on_a_resume_still_asks_only_for_what_failed_and_hits_are_counted_apart(
    baseline, tmp_path, monkeypatch
):
    monkeypatch.setattr(dspy, "cache", dspy.clients.cache.Cache(True, True, str(tmp_path / "cache"), 10**8, 10**5))
    plan = Outage(baseline["first_prompt"] + 6)
    with http_task.server() as server:
        server.plan = plan
        with pytest.raises(TaskFailureError):
            make_opro(server.url, log_dir=str(tmp_path / "run"), cache=True, **FAST).compile(
                dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL
            )
        plan.end()
        resumed = make_opro(server.url, log_dir=str(tmp_path / "run"), cache=True, **FAST).compile(
            dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL
        )
        assert outcome(resumed) == baseline["outcome"] and answered(server.requests) == baseline["answered"]
        counts = resumed.call_counts
        assert counts["task_lm"]["requests"] + counts["prompt_lm"]["requests"] == len(server.requests)
        assert counts["task_lm"]["cache_hits"] == counts["prompt_lm"]["cache_hits"] == 0  # nothing was asked twice
        sent = len(server.requests)

        # A new run of the same settings is answered from the cache alone: every call a hit, and no request but
        # the set-up check's one per model (a cached reply would not show that the model answers now).
        again = make_opro(server.url, log_dir=str(tmp_path / "again"), cache=True, **FAST).compile(
            dspy.Predict("question -> answer"), trainset=TRAIN, valset=VAL
        )
        new = server.requests[sent:]
        assert len(new) == 2 and all(map(is_probe, new)) and outcome(again) == baseline["outcome"]
        for role in ("task_lm", "prompt_lm"):
            stats = again.call_counts[role]
            assert stats["requests"] == 1 and stats["cache_hits"] == stats["calls"] - 1 > 0


def _flaky_once(questions: set[str], *, skip: str = "Answer."):
    """A plan failing (HTTP 500) the first request of each (instruction, question) pair for ``questions``."""
    seen, lock = set(), threading.Lock()

    def plan(request):
        if is_prompt(request):
            return None
        key = (http_task.instruction_of(request), http_task.question_of(request))
        with lock:
            first = key not in seen
            seen.add(key)
        return Fault("status", status=500) if first and key[1] in questions and key[0] != skip else None

    return plan


def test_max_errors_counts_the_failures_of_every_screening_round(tmp_path):
    from dspy_opro.screening import example_order

    train = make_set(17)  # screening rounds of 8, 8 and 1 examples
    order = example_order(len(train), 0)
    # Two failures in each of the first two rounds: never more than max_errors=3 in one round, four in all.
    flaky = {train[j].question for j in (order[0], order[1], order[8], order[9])}
    settings = dict(retries=0, num_steps=1, candidates_per_step=1)
    with http_task.server() as server:
        server.plan = _flaky_once(flaky)
        with pytest.raises(TaskFailureError, match="4 failed runs while scoring one candidate, more than max_errors=3"):
            make_opro(server.url, max_errors=3, log_dir=str(tmp_path), **settings).compile(
                dspy.Predict("question -> answer"), trainset=train
            )
    with http_task.server() as server:  # the same faults, tolerated: the failed examples are run again, not scored 0
        server.plan = _flaky_once(flaky)
        program = make_opro(server.url, max_errors=4, **settings).compile(
            dspy.Predict("question -> answer"), trainset=train
        )
    proposed = next(c for c in program.candidate_programs if c["step"] == 1)
    assert proposed["instruction"] == "Answer number." and proposed["score"] == pytest.approx(100 * 12 / 17)
    assert proposed["evaluated"] == 17 and proposed["failures"] == 4


def test_sixty_percent_server_errors_give_the_fault_free_result_or_a_resumable_error(tmp_path):
    settings = dict(retries=3, num_steps=1, candidates_per_step=2)
    with http_task.server() as server:
        clean = make_opro(server.url, **settings).compile(dspy.Predict("question -> answer"), trainset=TRAIN)
    with http_task.server() as server:
        server.plan = FaultPlan(Fault("status", status=500), share=0.6, seed=3)
        for _ in range(6):  # each stop saves its work; the next compile goes on from there
            try:
                program = make_opro(server.url, log_dir=str(tmp_path), **settings).compile(
                    dspy.Predict("question -> answer"), trainset=TRAIN
                )
                break
            except RunStoppedError as stop:
                assert "500" in str(stop) and stop.saved_to is not None
        else:
            pytest.fail("six compiles did not finish the run")
    assert outcome(program) == outcome(clean)
    assert all(c["failures"] >= 0 and c["evaluated"] == len(TRAIN) for c in program.candidate_programs)
    assert program.call_counts["task_lm"]["errors"] == sum(
        1 for r in server.requests if r.body.get("model") == http_task.TASK_MODEL and not r.succeeded
    )


def test_counts_after_a_resume_include_the_calls_made_after_the_last_save(tmp_path):
    calls, interrupt_at = [0], 30

    def metric(example, prediction, trace=None):  # interrupts the run in the middle of step 1
        calls[0] += 1
        if calls[0] == interrupt_at:
            raise KeyboardInterrupt
        return http_task.metric(example, prediction)

    with http_task.server() as server:
        with pytest.raises(KeyboardInterrupt):
            opro = make_opro(server.url, log_dir=str(tmp_path))
            opro.metric = metric
            opro.compile(dspy.Predict("question -> answer"), trainset=TRAIN)
        saved = json.loads((tmp_path / "opro_history.json").read_text())["counts"]
        assert saved["task_lm"]["requests"] < server.count()  # the history alone misses the calls since its save
        program = make_opro(server.url, log_dir=str(tmp_path)).compile(
            dspy.Predict("question -> answer"), trainset=TRAIN
        )
        counts = program.call_counts
        assert counts["task_lm"]["requests"] + counts["prompt_lm"]["requests"] == server.count()
        assert counts["task_lm"]["succeeded"] + counts["prompt_lm"]["succeeded"] == server.count(succeeded=True)
        assert counts["task_lm"]["prompt_tokens"] == sum(
            r.prompt_tokens for r in server.requests if r.body.get("model") == http_task.TASK_MODEL
        )


def test_a_retry_waits_as_long_as_retry_after_says_within_the_longest_wait(monkeypatch):
    from dspy_opro import calls

    with http_task.server() as server:
        lm = dspy.LM(
            f"openai/{http_task.PROMPT_MODEL}",
            api_base=server.url,
            api_key="k",
            engine="litellm",
            cache=False,
            num_retries=0,
        )
        monkeypatch.setattr(calls, "BACKOFF", calls.Backoff(first=0.001, max_delay=5.0, jitter=0.0))
        server.plan = FaultPlan(Fault("status", status=429, retry_after=0.4), first=1)
        done = calls.attempt(lambda: lm("hi"), retries=2, backoff=calls.BACKOFF, stop=threading.Event())
        assert done.ok and done.attempts == 2
        assert server.requests[1].received - server.requests[0].received >= 0.4
        # A provider asking for a minute gets the longest wait instead.
        server.plan = FaultPlan(Fault("status", status=429, retry_after=60), first=1)
        short = calls.Backoff(first=0.001, max_delay=0.2, jitter=0.0)
        done = calls.attempt(lambda: lm("hi again"), retries=2, backoff=short, stop=threading.Event())
        assert done.ok and 0.2 <= server.requests[3].received - server.requests[2].received < 5


def test_an_empty_or_unreadable_reply_is_a_wrong_answer_not_a_failure():
    from dspy_opro.counting import CallCounter
    from dspy_opro.history import Counts
    from dspy_opro.scoring import Scorer

    with http_task.server() as server:
        task, _ = http_task.lms(server.url)
        wanted = TRAIN[0].question
        server.plan = lambda r: Fault("empty") if http_task.question_of(r) == wanted else None
        counts = Counts()
        scorer = Scorer(
            http_task.metric, task_lm=task, num_threads=4, max_errors=0, counts=counts, counter=CallCounter(counts.task)
        )
        program = dspy.Predict("question -> answer")
        program.signature = program.signature.with_instructions("Answer number only.")
        [evaluation] = scorer.evaluate([program], TRAIN)
    assert evaluation.complete and evaluation.scores[0] == 0.0 and evaluation.scores[1:] == [1.0] * (len(TRAIN) - 1)
    # ChatAdapter's empty reply, then JSONAdapter's: two answered requests, no failure.
    assert counts.task.errors == 0 and counts.task.requests == len(TRAIN) + 1 == server.count(succeeded=True)


KILLED_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import dspy
from http_task import make_opro, make_set
make_opro({url!r}, log_dir={log_dir!r}, num_steps=6, timeout=5.0).compile(
    dspy.Predict("question -> answer"), trainset=make_set(9)
)
"""


@pytest.mark.slow
def test_after_kill_9_the_counts_include_the_killed_process_calls(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    history = tmp_path / "opro_history.json"
    with http_task.server() as server:
        server.plan = lambda request: Fault("stall", seconds=0.05)  # slow enough to be killed mid-step
        code = KILLED_CHILD.format(tests=str(TESTS), url=server.url, log_dir=str(tmp_path))
        child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            deadline = time.time() + 240
            while time.time() < deadline:
                if history.exists() and len(json.loads(history.read_text())["steps"]) >= 2:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the child run never finished step 1")
            sent = server.count()
            while server.count() < sent + 5:  # well into step 2
                time.sleep(0.01)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        saved = json.loads(history.read_text())["counts"]
        before_resume = server.count()
        assert saved["task_lm"]["requests"] + saved["prompt_lm"]["requests"] < before_resume

        server.plan = None
        program = make_opro(server.url, log_dir=str(tmp_path), num_steps=6).compile(
            dspy.Predict("question -> answer"), trainset=make_set(9)
        )
        counts = program.call_counts
        ours = counts["task_lm"]["requests"] + counts["prompt_lm"]["requests"]
        in_flight = counts["task_lm"]["interrupted"] + counts["prompt_lm"]["interrupted"]
        assert ours <= server.count() <= ours + in_flight
        assert counts["task_lm"]["succeeded"] + counts["prompt_lm"]["succeeded"] <= server.count(succeeded=True)


def test_a_fatal_error_of_the_prompt_model_stops_the_run_at_once(baseline, tmp_path):
    with http_task.server() as server:
        server.plan = Outage(
            baseline["first_prompt"], Fault("status", status=401, message="Incorrect API key provided.")
        )
        with pytest.raises(
            PromptModelError, match="prompt model 'openai/prompt-model' failed with an error that retrying"
        ):
            make_opro(server.url, log_dir=str(tmp_path)).compile(dspy.Predict("question -> answer"), trainset=TRAIN)
        assert server.count(succeeded=False) <= 3  # at most the samples already in flight
    saved = json.loads((tmp_path / "opro_history.json").read_text())
    assert [s["step"] for s in saved["steps"]] == [0] and saved["pending"]["replies"] == [None] * 3
