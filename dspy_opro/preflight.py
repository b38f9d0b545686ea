"""The set-up check before a run: can each model answer at all?

Before the first metric call, every model a run will call gets one cheap request ("Reply with
OK.", a few tokens, no retries, no cache). `dspy_opro.faults.classify` decides what a failure
means:

- ``FATAL`` (no or wrong API key, unknown model, no permission, a request the provider rejects)
  and ``PROGRAM`` (the LM itself is broken, e.g. a model file that does not load): the run stops
  at once with `ModelCheckError`, holding the provider's message and the fix, before anything is
  spent on the metric. A missing API key costs no request at all: DSPy's client finds it missing
  before sending (``engine="auto"``), and litellm likewise.
- ``TRANSIENT`` (rate limit, server error, timeout): the model may well work in a moment, so the
  check logs a warning and the run goes on under its own retry policy.

Checked: every `dspy.LM` whose connection DSPy or this package owns (a model string, a
``dspy.LM("provider/model", ...)``, `dspy_opro.local.text_lm`, a local GGUF model). Not checked:
LMs with a custom engine object, other `dspy.BaseLM` subclasses (`dspy.utils.DummyLM`, scripted
test LMs, a user's own client) and Python functions served with
`dspy_opro.local.register_generator`: they run user code whose answer to a generic request a
probe cannot predict (a generator may accept its own task's prompts only), and whose scripted
replies a probe would consume.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dspy

from .counting import CallCounter
from .faults import FATAL, PROGRAM, TRANSIENT, classify, describe
from .local.names import serves_generator
from .models import lm_name

logger = logging.getLogger(__name__)

PROBE_PROMPT = "Reply with the word OK."
PROBE_MAX_TOKENS = 16  # room for providers that refuse very small limits; a reply is one word
PROBE_TIMEOUT_S = 60.0

_FIXES = (
    "Check the API key (the environment variable the error names, or api_key= on dspy.LM), the model name "
    "and api_base, then run again. Nothing was spent on the metric."
)


class ModelCheckError(RuntimeError):
    """A model failed the set-up check with an error that retrying cannot fix.

    Attributes:
        role: ``"prompt_model"``, ``"task_model"`` or ``"predictor <name>"``.
        model: The model's name.
        kind: The `dspy_opro.faults` kind of the failure (``"fatal"`` or ``"program"``).
    """

    def __init__(self, message: str, *, role: str, model: str, kind: str):
        super().__init__(message)
        self.role, self.model, self.kind = role, model, kind


@dataclass
class CheckReport:
    """What the set-up check did: the models probed (one request each), skipped, and those that failed
    with a transient error (the run went on). The probes' calls and tokens are counted with each model's
    other calls (see `check_models`), not here."""

    checked: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    transient: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": len(self.checked),
            "errors": len(self.transient),
            "models": list(self.checked),
            "skipped": list(self.skipped),
        }


def is_checkable(lm: Any) -> bool:
    """Whether the check probes ``lm``: a `dspy.LM` whose connection DSPy or this package owns, other
    than a Python generator served as ``local/<name>`` (user code that may answer its own task only)."""
    if not isinstance(lm, dspy.LM):
        return False
    if serves_generator(lm):
        return False
    engine = lm.engine
    if isinstance(engine, str):
        return True
    from .local.lm import TextCompletionEngine

    return isinstance(engine, TextCompletionEngine)


def _identity(lm: Any) -> tuple:
    settings = tuple(sorted((k, repr(v)) for k, v in getattr(lm, "kwargs", {}).items()))
    return (type(lm), getattr(lm, "model", None), getattr(lm, "model_type", None), repr(lm.engine), settings)


class _QuietTruncation(logging.Filter):
    """Drops DSPy's "response was truncated" warning for the probes, whose replies are cut on purpose."""

    active = contextvars.ContextVar("dspy_opro_probe", default=False)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active.get() and "truncated" in record.getMessage())


_QUIET = _QuietTruncation()


@contextlib.contextmanager
def _quiet_truncation():
    targets = [logging.getLogger("dspy.clients.lm")]
    for target in targets:
        target.addFilter(_QUIET)
    token = _QuietTruncation.active.set(True)
    try:
        yield
    finally:
        _QuietTruncation.active.reset(token)
        for target in targets:
            target.removeFilter(_QUIET)


def _probe(lm: dspy.LM, counter: CallCounter | None) -> Exception | None:
    probe = lm.copy(num_retries=0, cache=False)
    kwargs: dict[str, Any] = {}
    if "max_completion_tokens" not in probe.kwargs:  # reasoning models take their own budget
        kwargs["max_tokens"] = PROBE_MAX_TOKENS
    if isinstance(probe.engine, str):  # a custom engine owns its connection settings
        kwargs["timeout"] = PROBE_TIMEOUT_S
    try:
        with counter.context() if counter is not None else contextlib.nullcontext(), _quiet_truncation():
            probe(PROBE_PROMPT, **kwargs)
    except Exception as exc:  # classified by the caller
        return exc
    return None


def _counter_for(roles: Sequence[str], counters: Mapping[str, CallCounter] | None) -> CallCounter | None:
    """The run's counter for the first of ``roles`` that has one (a model shared by roles is billed once)."""
    return next((counters[role] for role in roles if counters and role in counters), None)


def check_models(
    models: Sequence[tuple[str, Any]],
    *,
    num_threads: int = 4,
    counters: Mapping[str, CallCounter] | None = None,
) -> CheckReport:
    """Probe each distinct model once, in parallel; raise on the first that cannot work.

    Args:
        models: ``(role, lm)`` pairs, in the order errors should be reported. The same LM (or an
            identical copy) under several roles is probed once.
        counters: Role to the run's `CallCounter` for that model: a probe is counted (and logged in
            the call ledger) with the model's other calls, as the provider bills it.
        num_threads: Most probes in flight at once.

    Returns:
        Which models were probed, skipped, or failed transiently.

    Raises:
        ModelCheckError: A model failed with a ``FATAL`` or ``PROGRAM`` error.
    """
    report = CheckReport()
    distinct: dict[tuple, tuple[list[str], Any]] = {}
    for role, lm in models:
        if lm is None:
            continue
        if not is_checkable(lm):
            report.skipped.append(lm_name(lm))
            continue
        distinct.setdefault(_identity(lm), ([], lm))[0].append(role)
    if not distinct:
        return report
    entries = list(distinct.values())
    with ThreadPoolExecutor(
        max_workers=max(1, min(num_threads, len(entries))), thread_name_prefix="opro-check"
    ) as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, _probe, lm, _counter_for(roles, counters))
            for roles, lm in entries
        ]
        outcomes = [future.result() for future in futures]
    for (roles, lm), error in zip(entries, outcomes, strict=True):
        name = lm_name(lm)
        report.checked.append(name)
        if error is None:
            continue
        kind = classify(error)
        if kind in (FATAL, PROGRAM):
            role = " and ".join(roles)
            raise ModelCheckError(
                f"The {role} {name!r} cannot answer, so the run was not started: {describe(error)}. {_FIXES}",
                role=role,
                model=name,
                kind=kind,
            ) from error
        if kind == TRANSIENT:
            report.transient.append(name)
        logger.warning(
            "The %s %r did not answer the set-up check (%s: %s); starting anyway, its calls are retried as usual.",
            " and ".join(roles),
            name,
            kind,
            describe(error),
        )
    return report
