"""How OPRO makes model calls: retries with backoff, parallel jobs, and when to stop trying.

`dspy_opro.faults` says what a failure means; this module applies it to every call OPRO makes:

- A ``TRANSIENT`` failure is retried after a wait — the provider's ``Retry-After`` when it sends
  one, else an exponential backoff (`Backoff`) — up to the LM's own ``num_retries`` times (DSPy's
  knob, 3 by default). OPRO runs the retries itself, on copies of the LMs with DSPy's retries
  turned off (`without_retries`): each request the provider receives is then one DSPy LM call,
  which the call counter sees and `dspy_opro.counting.CallStats` reports.
- ``FATAL`` and ``PROGRAM`` failures are not retried: retrying cannot change them.
- A job (one program run on one example, or one prompt-model sample) that still fails is a
  *failure* with its kind. The caller decides what follows (`run_jobs` lets it stop the pool at
  once); OPRO never records a failure as a result.

When OPRO gives up, it raises a `RunStoppedError` (`TaskFailureError` for scoring,
`PromptModelError` for proposing) after saving everything that succeeded.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import dspy

from .faults import FATAL, TRANSIENT, classify, describe, retry_after

logger = logging.getLogger(__name__)

DEFAULT_RETRIES = 3  # for LMs that do not say (DSPy's own default for dspy.LM)


@dataclass(frozen=True)
class Backoff:
    """How long to wait before retrying a transient failure.

    Attributes:
        first: Seconds before the first retry; each further retry waits ``factor`` times longer.
        factor: Growth of the wait per retry.
        max_delay: The longest wait, a provider's ``Retry-After`` included.
        jitter: Random share added to each wait, so parallel threads do not retry in lockstep.
    """

    first: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.1

    def delay(self, retry: int, exc: BaseException) -> float:
        """The wait before retry number ``retry`` (0-based) after ``exc``."""
        hinted = retry_after(exc)
        base = hinted if hinted is not None else self.first * self.factor**retry
        return min(self.max_delay, base * (1 + self.jitter * random.random()))


BACKOFF = Backoff()
"""The backoff OPRO uses; replace it (``dspy_opro.calls.BACKOFF = Backoff(first=0.1)``) to retry sooner."""


class RunStoppedError(RuntimeError):
    """The run stopped because model calls kept failing, or failed in a way retrying cannot fix.

    Everything that succeeded before the stop is saved when the run has a ``log_dir``; compiling
    again with the same ``log_dir`` redoes only the failed and missing calls.

    Attributes:
        model: The failing model's name, when known.
        kind: The `dspy_opro.faults` kind of the last failure.
        last_error: A one-line description of the last failure.
        saved_to: The history file holding the work done, once the run saved it.
        unsaved: True when the run had no ``log_dir`` to save its work in.
    """

    def __init__(
        self, message: str, *, model: str | None = None, kind: str | None = None, last_error: str | None = None
    ):
        super().__init__(message)
        self.message = message
        self.model = model
        self.kind = kind
        self.last_error = last_error
        self.saved_to: str | None = None
        self.unsaved = False
        self.partial: Any = None  # what the stopped pass had measured, for the run to save

    def __str__(self) -> str:
        if self.unsaved:
            return f"{self.message} Nothing was saved: with log_dir set, a rerun would go on from here."
        if self.saved_to is None:
            return self.message
        return (
            f"{self.message} Everything that succeeded is saved in {self.saved_to}: run again with the same log_dir "
            "to redo only the failed and missing calls."
        )


class TaskFailureError(RunStoppedError):
    """Scoring stopped: the task model, the program or the metric kept failing."""


class PromptModelError(RunStoppedError):
    """Proposing stopped: the prompt model kept failing."""


class JobError(Exception):
    """A job's failure, with where it happened (``"the program"``, ``"the metric"``)."""

    def __init__(self, where: str, cause: BaseException):
        super().__init__(f"{where} raised {describe(cause)}")
        self.where = where
        self.cause = cause


@dataclass
class Outcome:
    """How one job ended: its value, or its last error with its `dspy_opro.faults` kind.

    ``failures`` holds the error of every attempt that failed, in order (a job that succeeded after a
    retry has one), for callers that keep a record of failed requests.
    """

    value: Any = None
    error: BaseException | None = None
    kind: str | None = None
    where: str = "the call"
    attempts: int = 1
    failures: list[BaseException] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        return f"{self.where} raised {describe(self.error)}" if self.error is not None else "ok"


def model_name(exc: BaseException | None, known: str | None) -> str:
    """The failing model: ``known`` (the model string OPRO was given), else the one a DSPy LM error names."""
    name = getattr(exc, "model", None)
    return known or (str(name) if isinstance(name, str) and name else "the configured LM")


def retries_of(lm: Any) -> int:
    """How many times a transient failure of ``lm`` is retried: its ``num_retries``."""
    value = getattr(lm, "num_retries", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else DEFAULT_RETRIES


def without_retries(lm: Any) -> Any:
    """A copy of ``lm`` that makes one request per call (OPRO retries itself; see the module docstring)."""
    if isinstance(lm, dspy.BaseLM) and getattr(lm, "num_retries", 0):
        return lm.copy(num_retries=0)
    return lm


def _may_use_litellm(lm: Any) -> bool:
    if lm is None:
        lm = dspy.settings.lm
    if lm is None:
        return False
    if isinstance(lm, dspy.LM):
        # A custom engine object and the native lm15 engine never touch litellm, nor do their cache entries.
        return isinstance(lm.engine, str) and lm.engine != "lm15"
    return True  # an LM of unknown make may call litellm


def finish_lazy_imports(lms: Iterable[Any]) -> None:
    """Import litellm in this thread, before any worker thread exists, when the run's LMs may use it.

    DSPy 3.4 imports litellm lazily, and its loader (``dspy.utils.lazy_import.require``) hands out
    ``sys.modules["litellm"]`` as soon as the entry exists, even while another thread is still running
    litellm's ``__init__``. In a fresh process the first parallel calls do exactly that when they mix
    DSPy cache hits and misses: a hit unpickles a cached litellm response and so imports litellm,
    and a miss in another thread meanwhile gets the half-initialised module ("partially initialized
    module 'litellm' has no attribute 'completion'"; ``KeyError: 'litellm'`` when that import then
    fails and is removed). With the import finished here first, no worker can see it half done.
    """
    if any(_may_use_litellm(lm) for lm in lms):
        try:
            importlib.import_module("litellm")
        except ImportError:  # not installed: the calls themselves will say so
            pass


def attempt(job: Callable[[], Any], *, retries: int, backoff: Backoff, stop: threading.Event, on_retry=None) -> Outcome:
    """Run ``job``, retrying transient failures (see the module docstring); never raises an ``Exception``."""
    tries, failures = 0, []
    while True:
        tries += 1
        try:
            return Outcome(value=job(), attempts=tries, failures=failures)
        except Exception as exc:
            where, cause = (exc.where, exc.cause) if isinstance(exc, JobError) else ("the call", exc)
            kind = classify(cause)
            failures.append(cause)
            outcome = Outcome(error=cause, kind=kind, where=where, attempts=tries, failures=list(failures))
            if kind != TRANSIENT or tries > retries or stop.is_set():
                return outcome
            wait_s = backoff.delay(tries - 1, cause)
            logger.debug("Retry %d of %d in %.2fs after %s", tries, retries, wait_s, outcome.describe())
            if on_retry is not None:
                on_retry()
            if stop.wait(wait_s):  # the pool is stopping: give up now instead of after the wait
                return outcome


def run_jobs(
    jobs: Sequence[Callable[[], Any]],
    *,
    num_threads: int,
    retries: int,
    on_outcome: Callable[[int, Outcome], bool],
    lms: Iterable[Any] = (),
    on_retry=None,
    backoff: Backoff | None = None,
    stop_on_fatal: bool = True,
    name: str = "opro",
) -> list[Outcome | None]:
    """Run ``jobs`` in a thread pool, each through `attempt`.

    ``on_outcome(i, outcome)`` is called in this thread as each job ends; when it returns True the
    pool stops: jobs not yet started are dropped (their outcome stays ``None``), running ones end
    (a retry wait ends at once) and are still reported. With ``stop_on_fatal`` a ``FATAL`` failure
    stops the pool the same way from the worker that met it, before another job can start. An
    exception from ``on_outcome`` stops the pool and propagates. Each job runs in a copy of this
    thread's context, so DSPy settings (``dspy.context``) reach the workers.

    Args:
        jobs: Callables taking no argument.
        num_threads: Worker threads.
        retries: Retries of a transient failure per job.
        on_outcome: See above.
        lms: The LMs the jobs call (see `finish_lazy_imports`).
        on_retry: Called (in the worker) before each retry.
        backoff: The waits; `BACKOFF` by default.
        stop_on_fatal: See above.
        name: Thread name prefix.

    Returns:
        One `Outcome` per job, ``None`` for jobs dropped by a stop.
    """
    outcomes: list[Outcome | None] = [None] * len(jobs)
    if not jobs:
        return outcomes
    finish_lazy_imports(lms)
    stop = threading.Event()
    schedule = backoff or BACKOFF

    def work(job: Callable[[], Any]) -> Outcome | None:
        if stop.is_set():
            return None
        outcome = attempt(job, retries=retries, backoff=schedule, stop=stop, on_retry=on_retry)
        if stop_on_fatal and outcome.kind == FATAL:
            stop.set()
        return outcome

    pool = ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(jobs))), thread_name_prefix=name)
    try:
        futures = {pool.submit(contextvars.copy_context().run, work, job): i for i, job in enumerate(jobs)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.cancelled() or future.result() is None:
                    continue
                i = futures[future]
                outcomes[i] = future.result()
                if on_outcome(i, outcomes[i]):
                    stop.set()
            if stop.is_set():
                for other in pending:
                    other.cancel()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


__all__ = [
    "BACKOFF",
    "Backoff",
    "JobError",
    "Outcome",
    "PromptModelError",
    "RunStoppedError",
    "TaskFailureError",
    "attempt",
    "finish_lazy_imports",
    "retries_of",
    "run_jobs",
    "without_retries",
]
