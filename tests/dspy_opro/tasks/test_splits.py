"""Seeded, disjoint splits of a data set."""

import dspy
import pytest

from dspy_opro.tasks import (
    split_examples,
)


def test_split_examples_is_seeded_and_disjoint():
    items = [dspy.Example(i=i) for i in range(10)]
    train, test = split_examples(items, [0.2, 8], seed=1)
    assert len(train) == 2 and len(test) == 8
    assert {e.i for e in train}.isdisjoint({e.i for e in test})
    assert [e.i for e in split_examples(items, [0.2], seed=1)[0]] == [e.i for e in train]
    with pytest.raises(ValueError, match="only 10 exist"):
        split_examples(items, [6, 6])
