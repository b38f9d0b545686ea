"""The paper's linear regression: reading pairs, the exact optimum, the starting pairs and the meta-prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dspy_opro.numeric import (
    InvalidProposal,
    LinearRegression,
    Scored,
    best_integer_pair,
    least_squares,
    render_meta_prompt,
)
from dspy_opro.numeric.linear_regression import extract_pair


@pytest.mark.parametrize(
    "reply, pair",
    [
        ("I propose [15, 14]", (15, 14)),
        ("The output must end with [w, b]. So: [16, 13]", (16, 13)),
        ("[w=17, b=-3]", (17, -3)),
        ("first [1, 2], then better: [3, 4]", (3, 4)),
        ("[15.0, 14]", (15, 14)),
        ("[ -2 , +5 ]", (-2, 5)),
        ("see [the list] and [12, 11] and [notes]", (12, 11)),
    ],
)
def test_chat_pairs_are_read_from_the_last_numeric_brackets(reply, pair):
    assert extract_pair(reply, "chat") == pair


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("", "no pair found"),
        ("w is 15 and b is 14", "no pair found"),
        ("End with [w, b].", "no pair found"),
        ("[15, 14, 3]", "no pair found"),
        ("[15.5, 14]", "non-integer"),
        ("[15, 1e9]", "out of range"),
        ("[1e400, 2]", "out of range"),
    ],
)
def test_chat_replies_without_a_valid_pair_are_rejected_with_a_reason(reply, reason):
    with pytest.raises(InvalidProposal) as caught:
        extract_pair(reply, "chat")
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("15, 14", (15, 14)),
        ("15, 14] value 3", (15, 14)),
        ("[16, 12", (16, 12)),  # the model opened its own bracket
        ("w=3, b=4", (3, 4)),
        ("", "no pair found"),
        ("\n15, 14", "no pair found"),
        ("15 14", "not a pair of numbers"),
        ("15, 14, 13", "not a pair of numbers"),
        ("2.5, 1", "non-integer"),
    ],
)
def test_base_replies_continue_the_open_bracket(reply, expected):
    if isinstance(expected, tuple):
        assert extract_pair(reply, "base") == expected
    else:
        with pytest.raises(InvalidProposal) as caught:
            extract_pair(reply, "base")
        assert caught.value.reason == expected


def test_problem_bounds_apply_to_parsing():
    problem = LinearRegression(max_abs=100)
    assert problem.parse("[100, -100]", "chat") == (100, -100)
    with pytest.raises(InvalidProposal, match="out of range"):
        problem.parse("[101, 0]", "chat")


@pytest.mark.parametrize("w, b, noise, seed", [(15, 14, 1.0, 0), (36, -1, 1.0, 3), (2, 30, 20.0, 1), (3.4, 5.6, 5, 2)])
def test_best_integer_pair_matches_a_grid_search(w, b, noise, seed):
    problem = LinearRegression(w_true=w, b_true=b, noise_std=noise, seed=seed)
    w_ls, b_ls = problem.least_squares
    grid = [
        (problem.evaluate((wi, bi)), (wi, bi))
        for wi in range(math.floor(w_ls) - 3, math.ceil(w_ls) + 4)
        for bi in range(math.floor(b_ls) - 60, math.ceil(b_ls) + 61)
    ]
    value, pair = min(grid)
    assert problem.optimum_solution == pair
    assert problem.optimum == pytest.approx(value)


def test_least_squares_matches_numpy():
    problem = LinearRegression(w_true=3, b_true=-2, noise_std=2, seed=5)
    assert least_squares(problem.x, problem.y) == pytest.approx(tuple(np.polyfit(problem.x, problem.y, 1)))
    pair, value = best_integer_pair(problem.x, problem.y)
    assert (pair, value) == (problem.optimum_solution, problem.optimum)
    assert value <= problem.evaluate(tuple(round(v) for v in problem.least_squares))


def test_the_paper_setup_is_reproduced():
    problem = LinearRegression(seed=7)
    assert problem.x.tolist() == list(range(1, 51))
    starts = problem.initial_solutions()
    assert len(starts) == len(set(starts)) == 5
    assert all(10 <= c <= 20 and isinstance(c, int) for pair in starts for c in pair)
    assert problem.optimum_solution not in starts
    assert LinearRegression(seed=7).initial_solutions() == starts  # seeded
    assert LinearRegression(seed=8).initial_solutions() != starts
    residuals = problem.y - (15 * problem.x + 14)
    assert abs(residuals.std() - 1.0) < 0.3  # N(0, 1) noise


def test_linear_regression_meta_prompts_golden():
    problem = LinearRegression(seed=0)
    history = [Scored((12, 11), 91234.4), Scored((15, 10), 824.45), Scored((18, 18), 418365.0), Scored((16, 14), 9.5)]
    assert render_meta_prompt(problem, history, style="chat", max_shown=3) == (
        "Help me minimize a function of two variables, w and b. Below are (w, b) pairs I have tried, each with the "
        "value of the function there. The pairs are listed from the highest value to the lowest, and lower values "
        "are better.\n"
        "\n"
        "input:\nw=12, b=11\nvalue:\n91234\n"
        "\n"
        "input:\nw=15, b=10\nvalue:\n824\n"
        "\n"
        "input:\nw=16, b=14\nvalue:\n10\n"
        "\n"
        "Propose a new (w, b) pair that differs from every pair above and has a lower function value than all of "
        "them. Do not write code. End your reply with the pair as [w, b], where w and b are integers."
    )
    assert render_meta_prompt(problem, history, style="base") == (
        "Pairs [w, b] and the value of a function at each pair, from the highest value to the lowest. Lower values "
        "are better; each new pair improves on the one before.\n"
        "\n"
        "[18, 18] value 418365\n"
        "[12, 11] value 91234\n"
        "[15, 10] value 824\n"
        "[16, 14] value 10\n"
        "["
    )
