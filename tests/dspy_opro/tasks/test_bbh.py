"""BIG-Bench Hard: answer kinds and the release files."""

import json

import dspy
import pytest

from dspy_opro.tasks import (
    bbh_kind,
    bbh_metric,
    load_bbh,
)


def test_bbh_kinds():
    assert bbh_kind(["(A)", "(C)"]) == "multiple_choice"
    assert bbh_kind(["True", "False"]) == "boolean"
    assert bbh_kind(["valid", "invalid"]) == "boolean"
    assert bbh_kind(["8", "-24"]) == "numeric"
    assert bbh_kind(["syndrome therefrom", "a b"]) == "free_form"


def test_bbh_from_release_files(tmp_path):
    data = {"examples": [{"input": "Q?\nOptions:\n(A) x\n(B) y", "target": "(B)"}] * 3}
    (tmp_path / "snarks.json").write_text(json.dumps(data))
    examples = load_bbh("snarks", data_dir=tmp_path)
    assert len(examples) == 3 and examples[0].kind == "multiple_choice"
    assert bbh_metric(examples[0], dspy.Prediction(answer="the answer is y"))
    with pytest.raises(ValueError, match="unknown BBH task"):
        load_bbh("snark", data_dir=tmp_path)
