"""OPRO's scoring passes as DSPy evaluations, for callback-based tools.

COPRO and MIPROv2 score through `dspy.Evaluate`, so every evaluation fires DSPy's
``on_evaluate_start`` / ``on_evaluate_end`` callbacks, nested under the compile call; MLflow's
DSPy autologging, for one, logs each as a child run. OPRO scores all of a step's candidates in
one thread pool (and screens them on minibatches), which `dspy.Evaluate` cannot do, so after each
scoring pass `report_evaluations` replays it as one evaluation per candidate, in candidate order,
on the compile call's thread: a start (inputs as `dspy.Evaluate.__call__` receives them, with
``callback_metadata={"metric_key": ...}``), then at once its end, whose output is a
`dspy.evaluate.EvaluationResult` (``score`` in percent, ``results`` as ``(example, prediction,
score)`` for the examples the candidate ran on; predictions are not kept, so each is an empty
``dspy.Prediction``). Start and end pairs never interleave, which tools that keep a stack of open
runs need. Nothing is built when no callback is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dspy
from dspy.evaluate.evaluate import EvaluationResult
from dspy.utils.callback import with_callbacks

TRAIN_FULL = "eval_full"  # scored on the whole trainset (MIPROv2's key for a full evaluation)
TRAIN_MINIBATCH = "eval_minibatch"  # stopped by screening before the whole trainset
VALSET = "eval_valset"


class _Replay(dspy.Evaluate):
    """A `dspy.Evaluate` whose call returns an evaluation OPRO has already run."""

    def __init__(self, *, devset, metric, num_threads, result: EvaluationResult):
        super().__init__(devset=devset, metric=metric, num_threads=num_threads, display_progress=False)
        self._result = result

    @with_callbacks
    def __call__(
        self,
        program: dspy.Module,
        metric: Callable | None = None,
        devset: list | None = None,
        num_threads: int | None = None,
        display_progress: bool | None = None,
        display_table: bool | int | None = None,
        callback_metadata: dict[str, Any] | None = None,
        save_as_csv: str | None = None,
        save_as_json: str | None = None,
    ) -> EvaluationResult:
        return self._result


def has_callbacks() -> bool:
    """Whether any DSPy callback is configured in this context."""
    return bool(dspy.settings.get("callbacks"))


def report_evaluations(
    programs: Sequence[dspy.Module],
    examples: Sequence[dspy.Example],
    evaluations: Sequence[Any],
    *,
    metric: Callable,
    num_threads: int,
    validation: bool = False,
) -> None:
    """Fire DSPy's evaluate callbacks once per program for a finished scoring pass.

    Args:
        programs: The programs scored, in order.
        examples: The examples they were scored on.
        evaluations: One `dspy_opro.scoring.Evaluation` per program (``scores[j] is None`` where
            the program was not run on example ``j``).
        metric: The metric, as the user gave it.
        num_threads: The threads the pass used.
        validation: Whether ``examples`` is the valset.
    """
    if not has_callbacks():
        return
    for program, evaluation in zip(programs, evaluations, strict=True):
        ran = [
            (example, score) for example, score in zip(examples, evaluation.scores, strict=True) if score is not None
        ]
        devset = [example for example, _ in ran]
        if validation:
            key = VALSET
        else:
            key = TRAIN_FULL if len(ran) == len(examples) else TRAIN_MINIBATCH
        result = EvaluationResult(
            score=round(evaluation.score, 2), results=[(example, dspy.Prediction(), score) for example, score in ran]
        )
        replay = _Replay(devset=devset, metric=metric, num_threads=num_threads, result=result)
        replay(program, callback_metadata={"metric_key": key})
