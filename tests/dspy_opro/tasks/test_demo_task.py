"""The demo task's problem generator and metric (no model needed)."""

import re

import dspy
import pytest

from dspy_opro.tasks import demo


def _solve(question):
    """Recompute a generated problem's answer from its text."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if " more " in question:
        return numbers[0] + numbers[1]
    if " away" in question:
        return numbers[0] - numbers[1]
    return numbers[0] * numbers[1]


@pytest.mark.parametrize("kind", sorted(demo.PROBLEM_KINDS))
def test_problems_have_the_right_answers(kind):
    problems = demo.make_problems(50, seed=1, kinds=[kind])
    assert len(problems) == 50
    for question, answer in problems:
        assert question.endswith("?")
        assert answer == _solve(question), question


def test_dataset_is_deterministic_by_seed_and_distinct():
    first = demo.make_dataset(30, seed=7)
    again = demo.make_dataset(30, seed=7)
    other = demo.make_dataset(30, seed=8)
    assert [e.question for e in first] == [e.question for e in again]
    assert [e.question for e in first] != [e.question for e in other]
    assert len({e.question for e in first}) == 30
    example = first[0]
    assert isinstance(example, dspy.Example)
    assert set(example.inputs().keys()) == {"question"}
    assert set(example.labels().keys()) == {"answer"}
    assert example.answer == str(_solve(example.question))
    # A longer dataset from the same seed starts with the shorter one.
    assert [e.question for e in demo.make_dataset(40, seed=7)[:30]] == [e.question for e in first]


def test_mixed_kinds_and_bad_kinds():
    questions = [q for q, _ in demo.make_problems(60, seed=0, kinds=sorted(demo.PROBLEM_KINDS))]
    assert any(" more " in q for q in questions) and any(" away" in q for q in questions)
    with pytest.raises(ValueError):
        demo.make_problems(3, kinds=["divide"])
    with pytest.raises(ValueError):
        demo.make_problems(3, kinds=[])


def test_splits_are_disjoint():
    train, val, test = demo.make_splits(15, 20, 25, seed=2)
    assert (len(train), len(val), len(test)) == (15, 20, 25)
    sets = [{e.question for e in split} for split in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_answer_metric():
    example = dspy.Example(question="q", answer="64").with_inputs("question")
    assert demo.answer_metric(example, dspy.Prediction(answer="8 * 8 = 64 chairs.")) == 1.0
    assert demo.answer_metric(example, dspy.Prediction(answer="The answer is 63.")) == 0.0
    assert demo.answer_metric(example, dspy.Prediction(answer="")) == 0.0
    assert demo.answer_metric(example, "64") == 1.0
    assert demo.answer_metric(example, dspy.Prediction(answer="64.0")) == 1.0


def test_make_program():
    program = demo.make_program("Answer the question.")
    assert isinstance(program, dspy.Predict)
    assert program.signature.instructions == "Answer the question."
    assert list(program.signature.input_fields) == ["question"]
    assert list(program.signature.output_fields) == ["answer"]
    assert demo.make_program().signature.instructions == dspy.Signature("question -> answer").instructions
