"""The final-choice study (benchmarks/final_choice.py): each rule picks the finalist it says."""

import pytest
from example_scripts import BENCHMARKS, loaded_script


@pytest.fixture(scope="module")
def study():
    with loaded_script(BENCHMARKS / "final_choice.py", "bench_final_choice") as module:
        yield module


def finalist(id, step, score, val_score, test):
    return {"id": id, "step": step, "score": score, "val_score": val_score, "test": test}


def test_each_rule_picks_its_finalist(study):
    sizes = {"train": 20, "val": 10}
    # train / validation / pooled over 30 examples: the start 10 / 70 / 30; #3 100 / 30 / 76.7; #5 60 / 70 / 63.3.
    candidates = [finalist(0, 0, 10.0, 70.0, 5.0), finalist(3, 1, 100.0, 30.0, 20.0), finalist(5, 2, 60.0, 70.0, 40.0)]
    picked = {rule: study.choose(rule, candidates, sizes)["id"] for rule in study.RULES}
    # validation: a tie at 70 broken by the training score; pooled: the most correct answers over both sets.
    assert picked == {"validation": 5, "pooled": 3, "train": 3, "start": 0, "oracle": 5}


def test_only_validated_candidates_are_finalists(study):
    record = {"details": {"top": [{"id": 0, "val_score": 10.0}, {"id": 1, "val_score": None}, {"id": 2}]}}
    assert [c["id"] for c in study.finalists(record)] == [0]
