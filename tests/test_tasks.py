import json

import dspy
import pytest

from dspy_opro.tasks import (
    answers_match,
    bbh_kind,
    bbh_metric,
    extract_number,
    gsm8k_metric,
    load_bbh,
    load_gsm8k,
    split_examples,
)


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is 72.", 72.0),
        ("She earned $1,250 in total. #### 1250", 1250.0),
        ("48 + 24 = 72, so the answer is: $72", 72.0),
        ("First 3, then 5, finally 8", 8.0),
        ("Answer: -4.5%", -4.5),
        ("the answer is 3/4", 0.75),
        ("no number here", None),
        ("", None),
        (None, None),
        (42, 42.0),
        ("There are 8 * 8 = 64 chairs in total.", 64.0),
        ("The answer is 12. Then 3 more.", 12.0),
        ("6 * 2 = 12\n#### 12\nThe answer is: 12 dollars", 12.0),
        ("I think it is 2.5 or 7", 7.0),
    ],
)
def test_extract_number(text, value):
    assert extract_number(text) == value


@pytest.mark.parametrize(
    "prediction, gold, kind, ok",
    [
        ("So the answer is (B).", "(B)", "multiple_choice", True),
        ("(A) then no, the answer is (C)", "(C)", "multiple_choice", True),
        ("B", "(B)", "multiple_choice", True),
        ("The answer is heptagon", "(B)", "multiple_choice", True),
        ("The answer is circle", "(B)", "multiple_choice", False),
        ("True", "True", "boolean", True),
        ("yes", "True", "boolean", True),
        ("The argument is invalid", "valid", "boolean", False),
        ("It is not valid, so: invalid", "invalid", "boolean", True),
        ("maybe", "False", "boolean", False),
        ("the answer is 24", "24", "numeric", True),
        ("the answer is 25", "24", "numeric", False),
        ("syndrome therefrom", "syndrome therefrom", "free_form", True),
        ("Sorted: Syndrome, therefrom.", "syndrome therefrom", "free_form", True),
        ("therefrom syndrome", "syndrome therefrom", "free_form", False),
    ],
)
def test_answers_match(prediction, gold, kind, ok):
    question = "Which shape?\nOptions:\n(A) circle\n(B) heptagon\n(C) kite"
    assert answers_match(prediction, gold, kind=kind, question=question) is ok


def test_bbh_kinds():
    assert bbh_kind(["(A)", "(C)"]) == "multiple_choice"
    assert bbh_kind(["True", "False"]) == "boolean"
    assert bbh_kind(["valid", "invalid"]) == "boolean"
    assert bbh_kind(["8", "-24"]) == "numeric"
    assert bbh_kind(["syndrome therefrom", "a b"]) == "free_form"


def test_gsm8k_from_release_files(tmp_path):
    rows = [
        {"question": "Natalia sold 48 clips and half as many more. Total?", "answer": "48/2 = 24\n48+24 = 72\n#### 72"},
        {"question": "Big numbers?", "answer": "work\n#### 1,250"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_gsm8k("train", data_dir=tmp_path)
    assert [e.answer for e in examples] == ["72", "1250"]
    assert set(examples[0].inputs().keys()) == {"question"} and "48+24" in examples[0].rationale
    assert gsm8k_metric(examples[0], dspy.Prediction(answer="so the answer is 72"))
    assert not gsm8k_metric(examples[0], dspy.Prediction(answer="24 then 73"))


def test_gsm8k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_gsm8k("test", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="train.jsonl:1"):
        load_gsm8k("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_gsm8k("dev", data_dir=tmp_path)


def test_hub_unreachable_names_the_offline_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="pass data_dir="):
        load_gsm8k("test")
    with pytest.raises(RuntimeError, match="boolean_expressions.json"):
        load_bbh("boolean_expressions")


def test_hub_rows_are_converted(monkeypatch):
    import datasets

    calls = []

    def fake_hub(path, name, split):
        calls.append((path, name, split))
        return [{"input": "not ( True ) is", "target": "False"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    examples = load_bbh("boolean_expressions")
    assert calls == [("lukaemon/bbh", "boolean_expressions", "test")]
    assert examples[0].kind == "boolean" and examples[0].answer == "False"


def test_bbh_from_release_files(tmp_path):
    data = {"examples": [{"input": "Q?\nOptions:\n(A) x\n(B) y", "target": "(B)"}] * 3}
    (tmp_path / "snarks.json").write_text(json.dumps(data))
    examples = load_bbh("snarks", data_dir=tmp_path)
    assert len(examples) == 3 and examples[0].kind == "multiple_choice"
    assert bbh_metric(examples[0], dspy.Prediction(answer="the answer is y"))
    with pytest.raises(ValueError, match="unknown BBH task"):
        load_bbh("snark", data_dir=tmp_path)


def test_split_examples_is_seeded_and_disjoint():
    items = [dspy.Example(i=i) for i in range(10)]
    train, test = split_examples(items, [0.2, 8], seed=1)
    assert len(train) == 2 and len(test) == 8
    assert {e.i for e in train}.isdisjoint({e.i for e in test})
    assert [e.i for e in split_examples(items, [0.2], seed=1)[0]] == [e.i for e in train]
    with pytest.raises(ValueError, match="only 10 exist"):
        split_examples(items, [6, 6])
