import math

import dspy
import pytest
from opro_scripted import make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.screening import (
    affordable,
    batch_ends,
    check_schedule,
    example_order,
    first_batch_size,
    minibatch,
    screen,
    shown_score,
    wilson_upper,
)
from dspy_opro.testing import scripted_lm


def test_wilson_upper_bound():
    assert wilson_upper(0.0, 8) == pytest.approx(0.333, abs=1e-3)
    assert wilson_upper(0.5, 10_000) == pytest.approx(0.51, abs=1e-3)
    assert wilson_upper(1.0, 5) == pytest.approx(1.0) and wilson_upper(0.3, 0) == 1.0
    # More evidence gives a tighter bound; the bound never falls below the observed mean.
    bounds = [wilson_upper(0.3, n) for n in (4, 16, 64, 256)]
    assert bounds == sorted(bounds, reverse=True) and all(b >= 0.3 for b in bounds)


def test_batches_double_and_cover_the_set():
    assert batch_ends(64, 8) == [8, 16, 32, 64]
    assert batch_ends(50, 8) == [8, 16, 32, 50]
    assert batch_ends(5, 8) == [5]
    assert first_batch_size(261) == 33 and first_batch_size(20) == 8
    assert sorted(example_order(30, 0)) == list(range(30)) and example_order(30, 0) == example_order(30, 0)


def one_good_among_bad(call):
    """Per meta-prompt: one proposal with both keywords, the rest hopeless."""
    k = one_good_among_bad.counts.setdefault(call.user, 0)
    one_good_among_bad.counts[call.user] = k + 1
    return "<INS>Answer with the number only.</INS>" if k == 7 else f"<INS>Respond in style {k}.</INS>"


def run(screening, **kwargs):
    one_good_among_bad.counts = {}
    return OPRO(
        metric,
        prompt_model=scripted_lm(one_good_among_bad, model="scripted/optimizer"),
        task_model=task_lm(),
        num_steps=1,
        num_threads=4,
        initial_instructions="Give the number.",  # scores 50
        screening=screening,
        show_progress=False,
        **kwargs,
    ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(64))


def test_screening_finds_the_same_best_with_far_fewer_calls():
    full, screened = run(False), run(True)
    assert screened.predictors()[0].signature.instructions == "Answer with the number only."
    assert full.predictors()[0].signature.instructions == "Answer with the number only."
    assert screened.score == full.score == 100.0
    assert full.call_counts["metric_calls"] == 64 * 9
    # 64 for the initial instruction, 64 for the good candidate, 8 for each hopeless one.
    assert screened.call_counts["metric_calls"] == 64 + 64 + 7 * 8
    by_instruction = {c["instruction"]: c for c in screened.candidate_programs}
    assert by_instruction["Respond in style 0."]["evaluated"] == 8
    assert by_instruction["Answer with the number only."]["evaluated"] == 64


def test_screened_out_candidates_are_never_chosen():
    screened = run(True)
    best = screened.candidate_programs[0]
    assert best["evaluated"] == 64
    assert all(c["evaluated"] == 64 for c in screened.candidate_programs if c["score"] >= best["score"])


def test_under_a_budget_screening_starts_candidates_it_could_not_afford_to_score_in_full():
    # 64 calls for the start leave 128 of a 192-call budget: full scoring affords 2 of the 8 proposals
    # (the good one, the 8th, is never scored); screening starts all 8 on 8 examples each (64 calls),
    # then continues only the leader within the 64 calls left.
    full = run(False, max_metric_calls=192)
    screened = run(True, max_metric_calls=192)
    assert full.call_counts["metric_calls"] == 192 and full.score == 50.0
    assert screened.call_counts["metric_calls"] <= 192
    assert screened.predictors()[0].signature.instructions == "Answer with the number only."
    assert screened.score == 100.0
    evaluated = sorted(c["evaluated"] for c in screened.candidate_programs if c["step"] == 1)
    assert evaluated == [8] * 7 + [64]


class CountingScorer:
    """Programs are numbers; program p scores 1 on an example when p > example index mod 4."""

    def __init__(self):
        self.calls = 0

    def evaluate(self, programs, examples, capture_traces=False, known=None, numbers=None):
        from dspy_opro.scoring import Evaluation

        self.calls += len(programs) * len(examples)
        return [
            Evaluation(scores=[float(p > e % 4) for e in examples], traces=[{} for _ in examples]) for p in programs
        ]


def test_a_round_over_budget_goes_on_with_the_leaders_only():
    scorer = CountingScorer()
    examples, order = list(range(16)), list(range(16))
    # threshold 0: no candidate is ever dropped by the bound, only by the budget
    results = screen(scorer, [1, 4, 2, 3], examples, threshold=0.0, order=order, first_batch=4, max_calls=24)
    assert scorer.calls == 24  # 4 x 4 in the first round, then 2 leaders x 4
    assert [r.evaluated for r in results] == [4, 8, 4, 8]
    assert screen(CountingScorer(), [1, 2], examples, threshold=0.0, order=order, max_calls=3)[0].evaluated == 0


def test_screening_says_how_many_new_candidates_a_budget_can_start():
    assert affordable(8, 64, math.inf, screened=True) == 8
    assert affordable(8, 64, 64, screened=False) == 1  # a full-set candidate costs 64 calls
    assert affordable(8, 64, 64, screened=True) == 8  # a screened one may cost only its first batch of 8
    assert affordable(8, 64, 7, screened=True) == 0 and affordable(8, 64, -5, screened=False) == 0


def test_the_minibatch_schedule_goes_on_only_with_candidates_that_beat_the_best_on_the_same_examples():
    scorer = CountingScorer()
    examples, order = list(range(16)), list(range(16))
    best = [float(2 > e % 4) for e in examples]  # program 2 is the best so far: 50 on the minibatch
    results = screen(scorer, [1, 4, 2, 3], examples, threshold=0.0, order=order, first_batch=4, against=best)
    # 1 (25) and 2 (a tie at 50) stop after the minibatch; 4 (100) and 3 (75) are scored on the other 12.
    assert [r.evaluated for r in results] == [4, 16, 4, 16]
    assert scorer.calls == 4 * 4 + 2 * 12
    assert [shown_score(r.scores, order[:4]) for r in results] == [25.0, 100.0, 50.0, 75.0]
    # Under a budget the leaders go on first, as in the bound rounds.
    results = screen(
        CountingScorer(), [1, 4, 2, 3], examples, threshold=0.0, order=order, first_batch=4, against=best, max_calls=28
    )
    assert [r.evaluated for r in results] == [4, 16, 4, 4]


def test_the_minibatch_is_the_first_round_and_the_same_for_every_step():
    assert minibatch(64, 3) == example_order(64, 3)[:8] and minibatch(5, 0) == example_order(5, 0)
    assert shown_score([1.0, None, 0.0, 1.0], [0, 3]) == 100.0 and shown_score([1.0, None], [0, 1]) is None


@pytest.mark.parametrize("value", ["paired", 2, None])
def test_an_unknown_schedule_is_refused_with_the_choices(value):
    with pytest.raises(ValueError, match=r"True .* False .* \"minibatch\""):
        check_schedule(value)
    with pytest.raises(ValueError, match="is not a schedule"):
        OPRO(metric, screening=value)
    assert check_schedule(1) is True and check_schedule("minibatch") == "minibatch"


def test_the_minibatch_schedule_finds_the_best_and_scores_the_others_on_one_minibatch():
    scheduled = run("minibatch")
    assert scheduled.predictors()[0].signature.instructions == "Answer with the number only."
    assert scheduled.score == 100.0
    evaluated = sorted(c["evaluated"] for c in scheduled.candidate_programs if c["step"] == 1)
    assert evaluated == [8] * 7 + [64]
    assert scheduled.call_counts["metric_calls"] == 64 + 8 * 8 + 56
