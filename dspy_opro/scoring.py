"""Scoring programs on examples in parallel threads, counting every call."""

from __future__ import annotations

import contextvars
import logging
import math
import numbers
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import dspy

from .models import CallCounter, Counts

logger = logging.getLogger(__name__)


class MetricError(TypeError):
    """The metric returned something that is not a score."""


class TaskFailureError(RuntimeError):
    """More examples failed than ``max_errors`` allows."""


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


@dataclass
class Evaluation:
    """One program scored on a list of examples.

    Attributes:
        scores: Per-example metric values (failures count as 0.0), in example order; ``None``
            for examples the program was not run on (see `dspy_opro.screening`).
        failures: Examples where the program or the metric raised.
        first_error: A short description of the first failure, if any.
        traces: With ``capture_traces``, per example: predictor name -> the inputs it received.
    """

    scores: list[float | None]
    failures: int = 0
    first_error: str | None = None
    traces: list[dict[str, dict[str, str]]] | None = None

    @property
    def evaluated(self) -> int:
        """How many examples the program was run on."""
        return sum(s is not None for s in self.scores)

    @property
    def score(self) -> float:
        """Mean metric value over the evaluated examples, as a percentage (0-100), DSPy's convention."""
        done = [s for s in self.scores if s is not None]
        return 100.0 * sum(done) / len(done) if done else 0.0


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

    Args:
        metric: ``metric(example, prediction)`` -> bool | float | Prediction with ``score``.
        task_lm: LM to run the program with; ``None`` keeps the context's LM.
        num_threads: Worker threads.
        max_errors: Failures tolerated per program evaluation before `TaskFailureError`.
        counts: Where metric calls, failures, LM calls and tokens are added.
        counter: Installs call counting in the worker threads.
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
    ):
        self.metric = metric
        self.task_lm = task_lm
        self.num_threads = max(1, num_threads)
        self.max_errors = max_errors
        self.counts = counts
        self.counter = counter
        self._lock = threading.Lock()

    def _run_one(self, program: dspy.Module, example: dspy.Example, capture: bool):
        overrides = {"trace": []}
        if self.task_lm is not None:
            overrides["lm"] = self.task_lm
        with self.counter.context(**overrides):
            try:
                prediction = program(**example.inputs())
            except Exception as exc:
                return None, f"the program raised {type(exc).__name__}: {exc}", None
            trace = _predictor_inputs(program, dspy.settings.trace) if capture else None
        try:
            value = self.metric(example, prediction)
        except Exception as exc:
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return None, f"the metric raised {detail}", trace
        return as_score(value), None, trace

    def evaluate(
        self,
        programs: Sequence[dspy.Module],
        examples: Sequence[dspy.Example],
        *,
        capture_traces: bool = False,
    ) -> list[Evaluation]:
        """Score every program on every example; results in the order of ``programs``."""
        results = [
            Evaluation(scores=[0.0] * len(examples), traces=[{} for _ in examples] if capture_traces else None)
            for _ in programs
        ]
        if not programs or not examples:
            return results
        jobs = [(p, j) for p in range(len(programs)) for j in range(len(examples))]
        pool = ThreadPoolExecutor(max_workers=min(self.num_threads, len(jobs)), thread_name_prefix="opro-score")
        try:
            futures = {}
            for p, j in jobs:
                run = contextvars.copy_context().run
                futures[pool.submit(run, self._run_one, programs[p], examples[j], capture_traces)] = (p, j)
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    p, j = futures[future]
                    score, error, trace = future.result()  # MetricError propagates from here
                    result = results[p]
                    with self._lock:
                        self.counts.metric_calls += 1
                    if trace is not None:
                        result.traces[j] = trace
                    if error is None:
                        result.scores[j] = score
                        continue
                    result.failures += 1
                    result.first_error = result.first_error or f"example {j}: {error}"
                    with self._lock:
                        self.counts.task_failures += 1
                    if result.failures > self.max_errors:
                        raise TaskFailureError(
                            f"{result.failures} of {len(examples)} examples failed while scoring one candidate, "
                            f"more than max_errors={self.max_errors}. First failure: {result.first_error}. "
                            "Check the task model (API key, rate limits, model name) and the metric; raise "
                            "max_errors to tolerate more failures."
                        )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results
