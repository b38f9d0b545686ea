"""The instruction-sensitive task suite: deterministic generation and exact metrics (no model needed)."""

import json
import re

import dspy
import pytest

from dspy_opro.tasks import SUITE, get_task
from dspy_opro.tasks.suite import ANTONYMS, PLURALS, first_json_object, reply_words

NAMES = sorted(SUITE)


def _input(task, example):
    return getattr(example, task.input_field)


@pytest.mark.parametrize("name", NAMES)
def test_datasets_are_deterministic_distinct_and_nested(name):
    task = SUITE[name]
    first = task.make_dataset(100, seed=3)
    again = task.make_dataset(100, seed=3)
    other = task.make_dataset(100, seed=4)
    assert [(_input(task, e), e.answer) for e in first] == [(_input(task, e), e.answer) for e in again]
    assert [_input(task, e) for e in first] != [_input(task, e) for e in other]
    assert len({_input(task, e) for e in first}) == 100
    assert [_input(task, e) for e in task.make_dataset(40, seed=3)] == [_input(task, e) for e in first[:40]]
    example = first[0]
    assert isinstance(example, dspy.Example)
    assert set(example.inputs().keys()) == {task.input_field}
    assert set(example.labels().keys()) == {"answer"}


@pytest.mark.parametrize("name", NAMES)
def test_standard_splits_are_disjoint(name):
    train, val, test = SUITE[name].make_splits(20, 20, 60, seed=0)
    assert (len(train), len(val), len(test)) == (20, 20, 60)
    field = SUITE[name].input_field
    sets = [{getattr(e, field) for e in split} for split in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


@pytest.mark.parametrize("name", NAMES)
def test_the_gold_answer_scores_one_and_junk_scores_zero(name):
    task = SUITE[name]
    for example in task.make_dataset(100, seed=1):
        assert task.metric(example, dspy.Prediction(answer=example.answer)) == 1.0
        assert task.metric(example, example.answer) == 1.0  # a bare string is read as the reply
        assert task.metric(example, dspy.Prediction(answer="I'm ready to help. What's the user's task?")) == 0.0
        assert task.metric(example, dspy.Prediction(answer=None)) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_program_and_instructions(name):
    task = SUITE[name]
    program = task.make_program("Do it.")
    assert program.signature.instructions == "Do it."
    assert list(program.signature.input_fields) == [task.input_field]
    assert list(program.signature.output_fields) == ["answer"]
    assert task.instructions["start"] == task.start
    assert {"start", "neutral", "good"} <= set(task.instructions)
    assert task.conveys in ("format", "operation", "language")
    if task.capacity is not None:
        assert len(task.make_dataset(task.capacity, seed=0)) == task.capacity
        with pytest.raises(ValueError, match="distinct inputs"):
            task.make_dataset(task.capacity + 1)


def test_unknown_task_names_the_choices():
    with pytest.raises(KeyError, match="plural"):
        get_task("pluralise")
    assert get_task("plural") is SUITE["plural"]


def test_answers_recomputed_from_the_inputs():
    for example in SUITE["yes_no"].make_dataset(200, seed=0):
        a, relation, b = re.fullmatch(r"Is (\d+) (\w+) than (\d+)\?", example.question).groups()
        truth = int(a) > int(b) if relation in ("greater", "larger") else int(a) < int(b)
        assert example.answer == ("yes" if truth else "no")
    answers = [e.answer for e in SUITE["yes_no"].make_dataset(200, seed=0)]
    assert 60 < answers.count("yes") < 140  # both answers are common
    for example in SUITE["json_record"].make_dataset(100, seed=0):
        record = json.loads(example.answer)
        assert set(record) == {"name", "age", "city"}
        assert record["name"] in example.text and str(record["age"]) in example.text and record["city"] in example.text
    labels = [e.answer for e in SUITE["sentiment"].make_dataset(100, seed=0)]
    assert set(labels) == {"positive", "negative"}
    for example in SUITE["sentiment"].make_dataset(100, seed=0):
        assert "positive" not in example.review.lower() and "negative" not in example.review.lower()
    for example in SUITE["plural"].make_dataset(50, seed=0):
        assert PLURALS[example.word] == example.answer != example.word
    for word, opposites in ANTONYMS.items():
        assert all(word in ANTONYMS[o] for o in opposites)  # opposites are symmetric


def _score(task_name, reply, fields):
    task = SUITE[task_name]
    example = dspy.Example(**fields).with_inputs(task.input_field)
    return task.metric(example, dspy.Prediction(answer=reply))


@pytest.mark.parametrize(
    "name, fields, reply, expected",
    [
        (
            "json_record",
            {"text": "x", "answer": '{"name": "Tom", "age": 40, "city": "Paris"}'},
            'JSON:\n{\n  "name": "Tom",\n  "age": 40,\n  "city": "Paris"\n}\nThis is JSON.',
            1.0,
        ),
        (
            "json_record",
            {"text": "x", "answer": '{"name": "Tom", "age": 40, "city": "Paris"}'},
            '{"name": "tom", "age": "40", "city": "paris"}',
            1.0,
        ),
        (
            "json_record",
            {"text": "x", "answer": '{"name": "Tom", "age": 40, "city": "Paris"}'},
            '{"name": "Tom", "age": 41, "city": "Paris"}',
            0.0,
        ),
        (
            "json_record",
            {"text": "x", "answer": '{"name": "Tom", "age": 40, "city": "Paris"}'},
            '{"name": "Tom", "age": 40}',
            0.0,
        ),
        (
            "json_record",
            {"text": "x", "answer": '{"name": "Tom", "age": 40, "city": "Paris"}'},
            '{"name": "Tom", "age": 40, "city": "Paris", "job": "cook"}',
            0.0,
        ),
        (
            "json_record",
            {"text": "x", "answer": '{"name": "Tom", "age": 40, "city": "Paris"}'},
            "name: Tom, age: 40, city: Paris",
            0.0,
        ),
        ("yes_no", {"question": "Is 7 greater than 4?", "answer": "yes"}, "Yes, 7 is greater than 4.", 1.0),
        ("yes_no", {"question": "Is 7 greater than 4?", "answer": "yes"}, "7 is greater than 4, yes.", 0.0),
        ("yes_no", {"question": "Is 7 greater than 4?", "answer": "yes"}, "No.", 0.0),
        ("sentiment", {"review": "x", "answer": "negative"}, "The sentiment of this review is negative.", 1.0),
        ("sentiment", {"review": "x", "answer": "negative"}, "Positive, not negative.", 0.0),
        ("sentiment", {"review": "x", "answer": "negative"}, "It was bad.", 0.0),
        ("plural", {"word": "mouse", "answer": "mice"}, 'The plural of the word "mouse" is "mice."', 1.0),
        ("plural", {"word": "mouse", "answer": "mice"}, "mouses", 0.0),
        ("antonym", {"word": "old", "answer": "new"}, "The opposite of this word is young.", 1.0),
        ("antonym", {"word": "old", "answer": "new"}, "NEW", 1.0),
        ("antonym", {"word": "old", "answer": "new"}, "The word old is an adjective.", 0.0),
        ("french_greeting", {"name": "Zoe", "answer": "Bonjour, Zoe !"}, "BONJOUR Zoé, ça va ?", 1.0),
        ("french_greeting", {"name": "Zoe", "answer": "Bonjour, Zoe !"}, "Bonjour, mademoiselle !", 0.0),
        ("french_greeting", {"name": "Zoe", "answer": "Bonjour, Zoe !"}, "Hello Zoe!", 0.0),
    ],
)
def test_metric_reads_replies_exactly(name, fields, reply, expected):
    assert _score(name, reply, fields) == expected


def test_reply_helpers():
    assert reply_words("Bonjour, Zoé! 3 CATS.") == ["bonjour", "zoe", "cats"]
    assert first_json_object('no {json here} but {"a": 1} and {"b": 2}') == {"a": 1}
    assert first_json_object("[1, 2]") is None
