"""The run history: clear errors for a file that cannot be resumed, and for a resume that is refused."""

import json

import dspy
import pytest
from opro_scripted import ScriptedOptimizer, make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.history import ALL_PREDICTORS, Candidate
from dspy_opro.testing import scripted_lm


def opro(log_dir, **kwargs):
    settings = dict(
        prompt_model=ScriptedOptimizer().lm(),
        task_model=task_lm(),
        num_steps=1,
        candidates_per_step=2,
        show_progress=False,
        log_dir=str(log_dir),
    )
    return OPRO(metric, **{**settings, **kwargs})


def compile_(optimizer, student=None, trainset=None):
    return optimizer.compile(student or dspy.Predict("question -> answer"), trainset=trainset or make_trainset(6))


def test_an_incomplete_history_says_what_is_missing(tmp_path):
    compile_(opro(tmp_path))
    path = tmp_path / "opro_history.json"
    data = json.loads(path.read_text())
    del data["candidates"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="incomplete or damaged: it has no 'candidates' entry.*move it away"):
        compile_(opro(tmp_path))


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", "is not a run history"),
        ('{"format_version": 1, "candidates": []}', "incompatible version"),
        ('{"candidates": [', "cannot read the history"),
    ],
)
def test_a_file_that_is_not_a_history_is_refused_before_any_call(tmp_path, content, match):
    (tmp_path / "opro_history.json").write_text(content)
    optimizer = ScriptedOptimizer()
    with pytest.raises(ValueError, match=match):
        compile_(opro(tmp_path, prompt_model=optimizer.lm()))
    assert optimizer.prompts == []


def test_a_refused_resume_names_what_differs(tmp_path):
    compile_(opro(tmp_path))
    other = scripted_lm(lambda call: "x", model="scripted/other")
    with pytest.raises(ValueError, match=r"task_model: 'scripted/other' here, 'scripted/task' in the file"):
        compile_(opro(tmp_path, task_model=other))
    with pytest.raises(ValueError, match=r"temperature: 0.5 here, 1.0 in the file"):
        compile_(opro(tmp_path, temperature=0.5))
    with pytest.raises(ValueError, match=r"different trainset \(7 examples here, 6 in the file\)"):
        compile_(opro(tmp_path), trainset=make_trainset(7))
    with pytest.raises(ValueError, match=r"different trainset \(example 2 differs\)"):
        changed = make_trainset(6)
        changed[2] = dspy.Example(question="What is 0 plus 0?", answer="0").with_inputs("question")
        compile_(opro(tmp_path), trainset=changed)
    with pytest.raises(ValueError, match=r"predictor 'self': question -> result here, question -> answer in the file"):
        compile_(opro(tmp_path), student=dspy.Predict("question -> result"))


def test_a_candidate_derives_its_score_examples_instruction_and_validation_score_from_its_results():
    candidate = Candidate(0, 1, "solve", {"extract": "List them.", "solve": "Add."}, [1.0, 0.0, None, 1.0])
    assert (candidate.instruction, candidate.evaluated) == ("Add.", 3)
    assert candidate.score == pytest.approx(100 * 2 / 3) and candidate.val_score is None
    start = Candidate(1, 0, ALL_PREDICTORS, {"extract": "List them.", "solve": "Add."}, [0.0])
    assert start.instruction == "List them."  # a starting configuration shows its first predictor's
    candidate.validation = {"scores": [1.0, 0.0], "failed": [], "program_errors": []}
    assert candidate.val_score is None  # a validation pass that has not ended gives no score
    candidate.validation["done"] = True
    assert candidate.val_score == 50.0
    data = candidate.to_json()
    assert data["score"] == candidate.score and data["instruction"] == "Add."  # written for people reading the file
    data["score"] = 99.0
    assert Candidate.from_json(data).score == candidate.score  # ... and derived again on reading
