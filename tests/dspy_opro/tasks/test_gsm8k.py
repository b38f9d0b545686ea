"""GSM8K: the release files and their errors."""

import json

import dspy
import pytest

from dspy_opro.tasks import (
    gsm8k_metric,
    load_gsm8k,
)


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
