"""Scoring with failures: a failed example is never a score (scripted models; HTTP faults are in test_calls)."""

import dspy
import pytest
from opro_scripted import ScriptedOptimizer, make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.calls import TaskFailureError
from dspy_opro.counting import CallCounter
from dspy_opro.history import Counts
from dspy_opro.scoring import Evaluation, Scorer


def scorer(metric_fn=metric, *, max_errors=10, lm=None):
    counts = Counts()
    return Scorer(
        metric_fn,
        task_lm=lm or task_lm(),
        num_threads=4,
        max_errors=max_errors,
        counts=counts,
        counter=CallCounter(counts.task),
    )


def program(instruction):
    predictor = dspy.Predict("question -> answer")
    predictor.signature = predictor.signature.with_instructions(instruction)
    return predictor


def test_a_metric_that_raises_leaves_the_example_unscored_and_is_not_run_again():
    calls = []

    def picky(example, prediction, trace=None):
        calls.append(example.question)
        if example.question.startswith("What is 2 "):
            raise ValueError("cannot read the answer")
        return metric(example, prediction)

    s = scorer(picky)
    [evaluation] = s.evaluate([program("Give the number only.")], make_trainset(6))
    assert evaluation.scores[1] is None and evaluation.program_errors == {1} and not evaluation.complete
    assert (
        evaluation.evaluated == 5 and evaluation.score == 100.0
    )  # the mean of what was scored, never a 0 for the failure
    assert len(calls) == 6 and s.counts.metric_calls == 5 and s.counts.task_failures == 1


def test_known_results_are_not_run_again():
    s = scorer()
    examples = make_trainset(6)
    known = Evaluation.empty(6)
    known.scores[:3] = [1.0, 0.0, 1.0]  # measured before; 0.0 for the second on purpose: it must be kept
    [evaluation] = s.evaluate([program("Give the number only.")], examples, known=[known])
    assert evaluation.scores == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0] and s.counts.task.calls == 3


def test_past_max_errors_scoring_stops_with_what_it_measured():
    def broken(example, prediction, trace=None):
        raise KeyError("missing_field")

    with pytest.raises(TaskFailureError, match="more than max_errors=2.*the metric raised KeyError") as stopped:
        scorer(broken, max_errors=2).evaluate([program("x")], make_trainset(8))
    [partial] = stopped.value.partial
    assert len(partial.program_errors) >= 3 and all(s is None for s in partial.scores)


def test_an_evaluation_round_trips_through_json():
    evaluation = Evaluation(scores=[1.0, None, 0.0], failed={1}, program_errors=set(), failures=2, first_error="x")
    again = Evaluation.from_json(evaluation.to_json())
    assert (again.scores, again.failed, again.failures, again.first_error) == ([1.0, None, 0.0], {1}, 2, "x")


class Careless(dspy.Module):
    """A program with a bug: it raises for instructions that say "carefully"."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        if "carefully" in self.predict.signature.instructions:
            raise RuntimeError("this program cannot handle careful answers")
        return self.predict(question=question)


def test_a_candidate_on_which_the_program_raised_is_left_out_of_the_run():
    optimizer = ScriptedOptimizer()
    compiled = OPRO(
        metric,
        prompt_model=optimizer.lm(),
        task_model=task_lm(),
        num_steps=2,
        candidates_per_step=8,
        num_threads=4,
        initial_instructions="Answer.",
        screening=False,
        show_progress=False,
    ).compile(Careless(), trainset=make_trainset(6))
    left_out = [c for c in compiled.candidate_programs if "carefully" in c["instruction"]]
    assert len(left_out) == 2 and all(c["program_errors"] == list(range(6)) for c in left_out)
    assert "carefully" not in compiled.predict.signature.instructions
    # Never shown to the prompt model as if it had a score.
    assert not any("carefully" in prompt.split("Below are some problems")[0] for prompt in optimizer.prompts)


def test_when_no_starting_instruction_can_be_scored_the_run_stops_and_says_why(tmp_path):
    def broken(example, prediction, trace=None):
        if example.question.startswith("What is 2 "):
            raise ValueError("cannot read the answer")
        return metric(example, prediction)

    optimizer = ScriptedOptimizer()
    with pytest.raises(
        TaskFailureError, match="None of the 1 initial instruction.*example 1: the metric raised ValueError"
    ):
        OPRO(
            broken,
            prompt_model=optimizer.lm(),
            task_model=task_lm(),
            max_errors=100,
            log_dir=str(tmp_path),
            show_progress=False,
        ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(5))
    assert optimizer.prompts == []
    # With the metric fixed, the rerun scores only the example that failed.
    lm = task_lm()
    program = OPRO(
        metric, prompt_model=optimizer.lm(), task_model=lm, num_steps=0, log_dir=str(tmp_path), show_progress=False
    ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(5))
    assert lm._engine_spec.calls == 1 and program.candidate_programs[0]["evaluated"] == 5
