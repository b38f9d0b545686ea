"""Loading through Hugging Face datasets: the offline message and the row conversion."""

import pytest

from dspy_opro.tasks import (
    load_bbh,
    load_gsm8k,
)


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
