"""The paper's traveling salesman problem: reading tours, the exact optimum, the heuristics and the meta-prompts."""

from __future__ import annotations

import itertools

import pytest

from dspy_opro.numeric import (
    InvalidProposal,
    Scored,
    TravelingSalesman,
    farthest_insertion,
    held_karp,
    nearest_neighbour,
    optimality_gap,
    random_points,
    render_meta_prompt,
    tour_length,
)
from dspy_opro.numeric.tsp import check_tour, extract_tour


@pytest.mark.parametrize(
    "reply, style, tour",
    [
        ("<trace>0,1,2,3</trace>", "chat", (0, 1, 2, 3)),
        ("Sure: <trace> 0, 2, 1, 3 </trace>", "chat", (0, 2, 1, 3)),
        ("<trace>0,1,2,3</trace> is long; better: <TRACE>0,3,1,2</TRACE>", "chat", (0, 3, 1, 2)),
        ("<trace>0 3 2 1</trace>", "chat", (0, 3, 2, 1)),
        ("<trace>0,1,3,2,0</trace>", "chat", (0, 1, 3, 2)),  # a closing return to 0 is dropped
        ("0,3,2,1", "base", (0, 3, 2, 1)),
        ("0,3,2,1</trace> length 5", "base", (0, 3, 2, 1)),
        ("0,3,2,1\n<trace>0,1,2,3</trace>", "base", (0, 3, 2, 1)),
    ],
)
def test_valid_tours_are_read(reply, style, tour):
    assert extract_tour(reply, style, 4) == tour


@pytest.mark.parametrize(
    "reply, style, reason",
    [
        ("no tour here", "chat", "no tour found"),
        ("<trace>0,1,2,3", "chat", "no tour found"),
        ("<trace></trace>", "chat", "empty tour"),
        ("<trace>0,1,x,3</trace>", "chat", "not integers"),
        ("<trace>0,1.5,2,3</trace>", "chat", "not integers"),
        ("<trace>1,0,2,3</trace>", "chat", "wrong start"),
        ("<trace>0,1,2,4</trace>", "chat", "unknown point"),
        ("<trace>0,-1,2,3</trace>", "chat", "unknown point"),
        ("<trace>0,1,1,3</trace>", "chat", "repeated point"),
        ("<trace>0,1,2</trace>", "chat", "missing points"),
        ("<trace>0,1,2,3,0,1</trace>", "chat", "repeated point"),
        ("", "base", "no tour found"),
        ("\n0,1,2,3", "base", "no tour found"),
        ("0,1,2,3,3", "base", "repeated point"),
    ],
)
def test_invalid_tours_are_rejected_with_a_reason(reply, style, reason):
    with pytest.raises(InvalidProposal) as caught:
        extract_tour(reply, style, 4)
    assert caught.value.reason == reason


def brute_force(points):
    n = len(points)
    return min(tour_length(points, (0, *rest)) for rest in itertools.permutations(range(1, n)))


@pytest.mark.parametrize("n, seed", [(2, 0), (3, 1), (4, 2), (5, 3), (6, 4), (7, 5), (8, 6)])
def test_held_karp_matches_brute_force(n, seed):
    points = random_points(n, seed=seed)
    tour, length = held_karp(points)
    assert check_tour(tour, n) == tour
    assert length == pytest.approx(tour_length(points, tour))
    assert length == pytest.approx(brute_force(points))


def test_held_karp_refuses_large_instances_clearly():
    with pytest.raises(ValueError, match="limited to 13 points"):
        held_karp(random_points(14))
    assert TravelingSalesman(n=14).optimum is None
    with pytest.raises(ValueError, match="limited to 13"):
        TravelingSalesman(n=14, exact=True)


@pytest.mark.parametrize("n, seed", [(5, 0), (9, 1), (13, 2), (40, 3)])
def test_heuristics_give_valid_tours_no_shorter_than_the_optimum(n, seed):
    points = random_points(n, seed=seed)
    optimum = held_karp(points)[1] if n <= 13 else 0.0
    for heuristic in (nearest_neighbour, farthest_insertion):
        tour = heuristic(points)
        assert check_tour(tour, n) == tour
        assert tour_length(points, tour) >= optimum - 1e-9


def test_nearest_neighbour_and_gap_on_a_known_instance():
    points = [(0, 0), (10, 0), (1, 0), (10, 1)]
    assert nearest_neighbour(points) == (0, 2, 1, 3)
    assert farthest_insertion(points) in {(0, 2, 1, 3), (0, 3, 1, 2), (0, 1, 3, 2), (0, 2, 3, 1)}
    assert optimality_gap(110.0, 100.0) == pytest.approx(10.0)


def test_random_points_are_distinct_integers_in_range_and_seeded():
    points = random_points(50, seed=3)
    assert len(set(points)) == 50
    assert all(-100 <= c <= 100 and isinstance(c, int) for p in points for c in p)
    assert random_points(50, seed=3) == points != random_points(50, seed=4)


def test_tsp_starts_are_distinct_non_optimal_tours_from_0():
    problem = TravelingSalesman(n=8, seed=1)
    starts = problem.initial_solutions()
    assert len(starts) == len(set(starts)) == 5
    assert all(check_tour(t, 8) == t for t in starts)
    assert not any(problem.is_optimal(problem.evaluate(t)) for t in starts)


def test_tsp_meta_prompts_golden():
    problem = TravelingSalesman(points=[(0, 0), (3, 4), (-5, 2), (10, -1)])
    history = [Scored((0, 1, 2, 3), 40.2), Scored((0, 2, 1, 3), 30.7), Scored((0, 3, 2, 1), 35.5)]
    assert render_meta_prompt(problem, history, style="chat", max_shown=2) == (
        "Here are 4 points and their coordinates:\n(0): (0, 0), (1): (3, 4), (2): (-5, 2), (3): (10, -1).\n"
        "\n"
        "Below are tours through these points, each with its length. The tours are listed from the longest to the "
        "shortest, and shorter tours are better.\n"
        "\n"
        "<trace>0,3,2,1</trace>\nlength:\n36\n"
        "\n"
        "<trace>0,2,1,3</trace>\nlength:\n31\n"
        "\n"
        "Write a new tour that differs from every tour above and is shorter than all of them. It must start at "
        "point 0 and visit every point exactly once. Write the point numbers separated by commas, starting with "
        "<trace> and ending with </trace>."
    )
    assert render_meta_prompt(problem, history, style="base") == (
        "Points and their coordinates: (0): (0, 0), (1): (3, 4), (2): (-5, 2), (3): (10, -1).\n"
        "\n"
        "Tours that start at point 0 and visit every point exactly once, from the longest to the shortest. Each new "
        "tour is shorter than the one before.\n"
        "\n"
        "<trace>0,1,2,3</trace> length 40\n"
        "<trace>0,3,2,1</trace> length 36\n"
        "<trace>0,2,1,3</trace> length 31\n"
        "<trace>"
    )
    assert problem.stop("base") == ["</trace>"] and problem.stop("chat") is None
