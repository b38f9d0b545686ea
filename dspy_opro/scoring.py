"""Scoring programs on examples in parallel threads: every call counted, no failure ever taken for a score."""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dspy

from .calls import Backoff, JobError, Outcome, TaskFailureError, model_name, run_jobs
from .counting import CallCounter
from .faults import FATAL, OUTPUT, PROGRAM, classify
from .models import lm_name

if TYPE_CHECKING:
    from .history import Counts

logger = logging.getLogger(__name__)

__all__ = ["Evaluation", "MetricError", "Scorer", "TaskFailureError", "as_score", "percent_of"]


class MetricError(TypeError):
    """The metric returned something that is not a score."""


def as_score(value) -> float:
    """A metric's return value as a float: bools, numbers, or objects with a ``score``."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        score = float(value)
        if math.isfinite(score):
            return score
        raise MetricError(f"the metric returned {value!r}; scores must be finite numbers")
    if hasattr(value, "score"):
        return as_score(value.score)
    raise MetricError(
        f"the metric returned {value!r} ({type(value).__name__}); it must return a bool, a number "
        "(1.0 = correct), or a dspy.Prediction with a `score`"
    )


def percent_of(scores: Sequence[float | None]) -> float:
    """The score of a program, 0-100 (DSPy's convention, and the one scale of every score in OPRO): the mean
    metric value over the examples that have one (``None``: not scored), x 100; 0 when none has."""
    done = [s for s in scores if s is not None]
    return 100.0 * sum(done) / len(done) if done else 0.0


@dataclass
class Evaluation:
    """One program scored on a list of examples, as far as it got.

    Attributes:
        scores: Per-example metric values, in example order; ``None`` where there is no score:
            the example was not run (see `dspy_opro.screening`) or its run failed.
        failed: Examples whose last run failed with a provider error (after its retries): to be
            run again, never scored.
        program_errors: Examples on which the program or the metric raised: not scored, and the
            candidate is left out of the choice (`complete` is False).
        failures: Failed runs (after retries), over every round and resume.
        first_error: A short description of the first failure, if any.
        traces: With ``capture_traces``, per example: predictor name -> the inputs it received.
        notes: With ``capture_traces``, per example: what the program answered (``"output"``: output
            field -> text) and, when the metric returned one, its ``"feedback"`` (GEPA's
            ``dspy.Prediction(score=..., feedback=...)``).
        strikes: Failed runs in this process's scoring of the candidate (screening rounds and
            repair rounds included); past ``max_errors`` the scoring stops. Not saved.
        last_error: The last failure's exception. Not saved.
    """

    scores: list[float | None]
    failed: set[int] = field(default_factory=set)
    program_errors: set[int] = field(default_factory=set)
    failures: int = 0
    first_error: str | None = None
    traces: list[dict[str, dict[str, str]]] | None = None
    notes: list[dict[str, Any]] | None = None
    strikes: int = 0
    last_error: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, n: int, *, traces: bool = False) -> Evaluation:
        if not traces:
            return cls(scores=[None] * n)
        return cls(scores=[None] * n, traces=[{} for _ in range(n)], notes=[{} for _ in range(n)])

    @property
    def evaluated(self) -> int:
        """How many examples have a score."""
        return sum(s is not None for s in self.scores)

    @property
    def complete(self) -> bool:
        """Whether every example that was run succeeded (a screened-out candidate can be complete)."""
        return not self.failed and not self.program_errors

    @property
    def score(self) -> float:
        """Mean metric value over the scored examples, as a percentage (0-100): `percent_of` the scores."""
        return percent_of(self.scores)

    def subset(self, indices: Sequence[int]) -> Evaluation:
        """The results on ``indices`` (in that order) as an evaluation of those examples."""
        position = {j: k for k, j in enumerate(indices)}
        return Evaluation(
            scores=[self.scores[j] for j in indices],
            failed={position[j] for j in self.failed if j in position},
            program_errors={position[j] for j in self.program_errors if j in position},
            failures=self.failures,
            first_error=self.first_error,
            traces=None if self.traces is None else [self.traces[j] for j in indices],
            notes=None if self.notes is None else [self.notes[j] for j in indices],
            strikes=self.strikes,
            last_error=self.last_error,
        )

    def update(self, other: Evaluation, indices: Sequence[int]) -> None:
        """Take ``other``'s results for ``indices`` (``other`` evaluated exactly those examples)."""
        for k, j in enumerate(indices):
            if other.scores[k] is not None or self.scores[j] is None:
                self.scores[j] = other.scores[k]
            if self.traces is not None and other.traces is not None and other.traces[k]:
                self.traces[j] = other.traces[k]
            if self.notes is not None and other.notes is not None and other.notes[k]:
                self.notes[j] = other.notes[k]
            for mine, theirs in ((self.failed, other.failed), (self.program_errors, other.program_errors)):
                if k in theirs:
                    mine.add(j)
                else:
                    mine.discard(j)
        self.failures, self.strikes = other.failures, other.strikes
        self.first_error = self.first_error or other.first_error
        self.last_error = other.last_error or self.last_error

    def to_json(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "failed": sorted(self.failed),
            "program_errors": sorted(self.program_errors),
            "failures": self.failures,
            "first_error": self.first_error,
            "traces": self.traces,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evaluation:
        return cls(
            scores=list(data["scores"]),
            failed=set(data.get("failed", [])),
            program_errors=set(data.get("program_errors", [])),
            failures=int(data.get("failures", 0)),
            first_error=data.get("first_error"),
            traces=data.get("traces"),
            notes=data.get("notes"),
        )


UNREADABLE = "the program's reply could not be read (no answer in the expected format)"
NOTE_LENGTH = 300  # characters kept of each output field and of the feedback


def _note(prediction: Any, value: Any) -> dict[str, Any]:
    """What a meta-prompt may show of one run: the program's output fields and the metric's feedback."""
    items = prediction.items() if hasattr(prediction, "items") else [("answer", prediction)]
    note: dict[str, Any] = {"output": {str(k): str(v)[:NOTE_LENGTH] for k, v in items}}
    feedback = getattr(value, "feedback", None)
    if feedback is not None and str(feedback).strip():
        note["feedback"] = str(feedback).strip()[:NOTE_LENGTH]
    return note


def _predictor_inputs(program: dspy.Module, trace) -> dict[str, dict[str, str]]:
    names = {id(predictor): name for name, predictor in program.named_predictors()}
    seen: dict[str, dict[str, str]] = {}
    for predictor, inputs, _ in trace:
        name = names.get(id(predictor))
        if name is not None and name not in seen:
            seen[name] = {key: str(value) for key, value in inputs.items()}
    return seen


class Scorer:
    """Runs programs over examples with a thread pool and the metric.

    Every (program, example) pair is one job, so a step's candidates are scored together and
    the pool stays busy. Each job runs in a copy of the caller's DSPy context (so
    ``dspy.context`` settings such as the adapter reach the workers), with the task model,
    a fresh trace and the call counter installed.

    What a job's failure means follows `dspy_opro.faults` (retries: `dspy_opro.calls`):

    - The model's reply could not be parsed (``OUTPUT``): that is its answer, scored 0.
    - A provider error that outlived its retries: the example is *failed*, not scored. Failed
      examples are run again in a repair round once the others are done (a short outage is over
      by then), until all succeed. A round in which every job fails means the model is down.
    - The program or the metric raised (``PROGRAM``): the example is not scored and is not run
      again; the candidate is incomplete and is left out of the choice.

    Scoring stops with `TaskFailureError` (carrying what it measured in ``partial``) at the first
    ``FATAL`` error, when one program's failures pass ``max_errors``, or when a whole round fails.

    Args:
        metric: ``metric(example, prediction)`` -> bool | float | Prediction with ``score``.
        task_lm: LM to run the program with; ``None`` keeps the context's LM.
        num_threads: Worker threads.
        max_errors: Failures tolerated per program before `TaskFailureError`.
        counts: Where scored pairs and failures are added.
        counter: Installs call counting in the worker threads.
        retries: Retries of a transient failure per job.
        backoff: Waits between retries; `dspy_opro.calls.BACKOFF` by default.
    """

    def __init__(
        self,
        metric: Callable,
        *,
        task_lm: dspy.BaseLM | None,
        num_threads: int,
        max_errors: int,
        counts: Counts,
        counter: CallCounter,
        retries: int = 0,
        backoff: Backoff | None = None,
    ):
        self.metric = metric
        self.task_lm = task_lm
        self.num_threads = max(1, num_threads)
        self.max_errors = max_errors
        self.counts = counts
        self.counter = counter
        self.retries = retries
        self.backoff = backoff

    def _run_one(self, program: dspy.Module, example: dspy.Example, capture: bool):
        overrides = {"trace": []}
        if self.task_lm is not None:
            overrides["lm"] = self.task_lm
        with self.counter.context(**overrides):
            try:
                prediction = program(**example.inputs())
            except Exception as exc:
                if classify(exc) == OUTPUT:  # the model answered, unreadably: a wrong answer
                    return 0.0, ({}, {"output": {}, "feedback": UNREADABLE}) if capture else None
                raise JobError("the program", exc) from exc
            trace = _predictor_inputs(program, dspy.settings.trace) if capture else None
        try:
            value = self.metric(example, prediction)
        except Exception as exc:
            raise JobError("the metric", exc) from exc
        score = as_score(value)  # a MetricError here is a bug in the metric: it stops the run
        return score, (trace, _note(prediction, value)) if capture else None

    def _lms(self, programs: Sequence[dspy.Module]) -> list:
        return [self.task_lm] + [p.lm for program in programs for p in program.predictors() if p.lm is not None]

    def evaluate(
        self,
        programs: Sequence[dspy.Module],
        examples: Sequence[dspy.Example],
        *,
        capture_traces: bool = False,
        known: Sequence[Evaluation | None] | None = None,
        numbers: Sequence[int] | None = None,
    ) -> list[Evaluation]:
        """Score every program on every example; results in the order of ``programs``.

        Args:
            programs: The programs.
            examples: The examples.
            capture_traces: Record each predictor's inputs per example.
            known: Per program, results measured before (by a run that stopped): examples with a
                score are not run again, the others are.
            numbers: The examples' numbers in the caller's set, for messages (their positions by default).
        """
        numbers = list(numbers) if numbers is not None else list(range(len(examples)))
        n = len(examples)
        results = []
        for p in range(len(programs)):
            result = Evaluation.empty(n, traces=capture_traces)
            if known is not None and known[p] is not None:
                result.update(known[p], range(n))
                result.failed.clear()  # everything without a score is run again
                result.program_errors.clear()
            results.append(result)
        todo = [(p, j) for p in range(len(programs)) for j in range(n) if results[p].scores[j] is None]
        while todo:
            stop: dict[str, Any] = {}

            def record(i: int, outcome: Outcome, todo=todo, stop=stop) -> bool:
                p, j = todo[i]
                result = results[p]
                if outcome.ok:
                    score, captured = outcome.value
                    result.scores[j] = score
                    result.failed.discard(j)
                    if captured is not None and result.traces is not None:
                        result.traces[j], result.notes[j] = captured
                    self.counts.metric_calls += 1
                    return False
                if isinstance(outcome.error, MetricError):
                    raise outcome.error
                result.failures += 1
                result.strikes += 1
                self.counts.task_failures += 1
                result.first_error = result.first_error or f"example {numbers[j]}: {outcome.describe()}"
                result.last_error = outcome.error
                (result.program_errors if outcome.kind == PROGRAM else result.failed).add(j)
                if outcome.kind == FATAL or result.strikes > self.max_errors:
                    stop.setdefault("why", (p, j, outcome))
                return bool(stop)

            jobs = [functools.partial(self._run_one, programs[p], examples[j], capture_traces) for p, j in todo]
            outcomes = run_jobs(
                jobs,
                num_threads=self.num_threads,
                retries=self.retries,
                on_outcome=record,
                lms=self._lms(programs),
                on_retry=self.counter.on_retry,
                backoff=self.backoff,
                name="opro-score",
            )
            failed = [(todo[i], o) for i, o in enumerate(outcomes) if o is not None and not o.ok]
            if stop:
                p, j, last = stop["why"]
                raise self._stopped(results, p, numbers[j], last)
            if failed and len(failed) == sum(o is not None for o in outcomes):
                (p, j), last = failed[-1]
                raise self._stopped(results, p, numbers[j], last, whole_round=len(failed))
            todo = [(p, j) for (p, j), outcome in failed if outcome.kind != PROGRAM]
            if todo:
                logger.warning(
                    "Running %d example(s) again whose calls failed: %s", len(todo), failed[-1][1].describe()
                )
        return results

    def _stopped(
        self, results: list[Evaluation], p: int, j: int, outcome: Outcome, *, whole_round: int = 0
    ) -> TaskFailureError:
        result = results[p]
        model = model_name(outcome.error, lm_name(self.task_lm))
        last = f"example {j}: {outcome.describe()}"
        provider = outcome.kind != PROGRAM
        if outcome.kind == FATAL:
            message = (
                f"The task model {model!r} failed with an error that retrying cannot fix ({last}). Fix its cause "
                "(API key, model name, permissions, quota, request settings) and run again."
            )
        elif whole_round:
            message = (
                f"All {whole_round} runs of the last scoring round failed"
                + (f", each after {self.retries} retries" if provider and self.retries else "")
                + f": {'the task model ' + repr(model) + ' is unavailable' if provider else 'the program or the metric is broken'}. "
                f"Last failure: {last}."
            )
        else:
            message = (
                f"{result.strikes} failed runs while scoring one candidate, more than "
                f"max_errors={self.max_errors}. First failure: {result.first_error}. Last: {last}. Check the task "
                f"model {model!r} (API key, rate limits, model name) and the metric; raise max_errors to tolerate "
                "more failures."
            )
        error = TaskFailureError(message, model=model, kind=outcome.kind, last_error=outcome.describe())
        error.partial = results
        return error
