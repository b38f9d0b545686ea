from collections import Counter

import pytest

from dspy_opro.exemplars import EXEMPLAR_STRATEGIES, select_exemplars


def pick(strategy, step=1, **kwargs):
    return select_exemplars(strategy, n_examples=20, k=3, seed=0, step=step, **kwargs)


def test_random_is_reproducible_per_step_and_changes_between_steps():
    assert pick("random", step=4) == pick("random", step=4)
    draws = {tuple(pick("random", step=s)) for s in range(1, 10)}
    assert len(draws) > 1
    assert all(len(set(d)) == 3 and all(0 <= i < 20 for i in d) for d in draws)


def test_constant_is_the_same_every_step():
    assert {tuple(pick("constant", step=s)) for s in range(1, 10)} == {tuple(pick("constant"))}


def test_accumulative_draws_only_from_examples_ever_wrong():
    wrong = Counter({2: 1, 5: 3, 7: 1, 11: 2, 13: 1})
    for step in range(1, 10):
        assert set(pick("accumulative_most_frequent", step=step, wrong_ever=wrong)) <= set(wrong)


def test_current_takes_the_most_frequently_wrong():
    wrong = Counter({4: 5, 9: 4, 1: 3, 2: 1, 3: 1})
    assert pick("current_most_frequent", wrong_current=wrong) == [1, 4, 9]


def test_wrong_answer_strategies_fill_up_when_few_are_wrong():
    chosen = pick("current_most_frequent", wrong_current=Counter({6: 2}))
    assert 6 in chosen and len(chosen) == 3
    chosen = pick("accumulative_most_frequent", wrong_ever=Counter())
    assert len(chosen) == 3


def test_small_sets_and_zero():
    assert select_exemplars("random", n_examples=2, k=3, seed=0, step=1) == [0, 1]
    assert select_exemplars("random", n_examples=10, k=0, seed=0, step=1) == []


def test_unknown_strategy():
    with pytest.raises(ValueError, match="exemplar_selection must be one of"):
        pick("best")
    assert len(EXEMPLAR_STRATEGIES) == 5


def test_best_wrong_draws_from_what_the_best_gets_wrong_afresh_each_step():
    wrong = [1, 3, 8, 12, 15, 19]
    draws = {tuple(pick("best_wrong", step=s, wrong_best=wrong)) for s in range(1, 10)}
    assert all(set(d) <= set(wrong) and len(d) == 3 for d in draws)
    assert len(draws) > 1
    # Fewer wrong than asked for: all of them, filled up at random.
    chosen = pick("best_wrong", wrong_best=[4])
    assert 4 in chosen and len(chosen) == 3
