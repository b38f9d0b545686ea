"""The Problem interface: which solutions a meta-prompt shows, and each problem's families."""

from __future__ import annotations

from dspy_opro.numeric import (
    Scored,
    choose_shown,
)


def test_shown_solutions_are_the_best_worst_first():
    history = [Scored("a", 5.0), Scored("b", 1.0), Scored("c", 3.0), Scored("d", 3.0), Scored("e", 9.0)]
    assert [s.solution for s in choose_shown(history, max_shown=3, minimize=True)] == ["c", "d", "b"]
    assert [s.solution for s in choose_shown(history, max_shown=3, minimize=False)] == ["d", "a", "e"]
    assert [s.solution for s in choose_shown(history, max_shown=10, minimize=True)] == ["e", "a", "c", "d", "b"]
