"""Counting model calls: per-role statistics, the counter that collects them, and the call ledger.

`CallCounter` is the one call meter of the package. OPRO installs one per model role (task, prompt)
around the calls of that role; a counter without a role reads each call's role from the LM that makes
it (`CallCounter.tag`), so it can meter code that calls several models at once, such as another
optimizer's ``compile``. Its totals are `CallStats`; `CallLedger` appends every call event to a file
so that counts survive a killed process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

logger = logging.getLogger(__name__)

ROLE_ATTRIBUTE = "_dspy_opro_role"  # set by `CallCounter.tag`; survives ``lm.copy()``
UNTAGGED = "other"


@dataclass
class CallStats:
    """Model calls and tokens of one role (task model or prompt model).

    Attributes:
        calls: LM calls made by DSPy programs and by OPRO, cache hits included.
        requests: Requests sent to the provider: calls that were not cache hits, retries included.
        succeeded: Requests answered.
        failed: Failed requests by `dspy_opro.faults` kind (``"transient"``, ``"fatal"``, ``"program"``).
        error_types: Failed requests by exception type (``"LMRateLimitError"``, ``"LMTimeoutError"``, ...).
        retries: Requests that repeated a failed one (a transient failure retried after a backoff).
        cache_hits: Calls answered from DSPy's cache: no request, no tokens.
        prompt_tokens: Prompt tokens the provider reported, for every request that reported usage
            (failed ones included; a request that timed out or lost its connection reports none).
        completion_tokens: The same for completion tokens.
        completions: Completions the calls returned (a call may ask for several, ``n``), cache hits included.
    """

    calls: int = 0
    requests: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    completions: int = 0

    @property
    def errors(self) -> int:
        """Failed requests of any kind."""
        return sum(self.failed.values())

    @property
    def interrupted(self) -> int:
        """Calls that started and never ended: the process was killed while they were in flight."""
        return max(0, self.calls - self.succeeded - self.errors - self.cache_hits)

    def apply(self, event: dict[str, Any]) -> None:
        """Add one call event (see `CallCounter`) to the totals; the call ledger replays the same events."""
        kind = event.get("event")
        if kind == "start":
            self.calls += 1
        elif kind == "retry":
            self.retries += 1
        elif kind == "end":
            outcome = event.get("outcome")
            self.prompt_tokens += int(event.get("prompt_tokens") or 0)
            self.completion_tokens += int(event.get("completion_tokens") or 0)
            self.completions += int(event.get("completions") or 0)
            if outcome == "cached":
                self.cache_hits += 1
                return
            self.requests += 1
            if outcome == "ok":
                self.succeeded += 1
            else:
                failure = str(event.get("kind") or "unknown")
                self.failed[failure] = self.failed.get(failure, 0) + 1
                name = str(event.get("type") or "Exception")
                self.error_types[name] = self.error_types.get(name, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "requests": self.requests,
            "succeeded": self.succeeded,
            "errors": self.errors,
            "failed": dict(self.failed),
            "error_types": dict(self.error_types),
            "retries": self.retries,
            "cache_hits": self.cache_hits,
            "interrupted": self.interrupted,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "completions": self.completions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallStats:
        """Read `as_dict`'s output (and the older ``calls``/``errors``/tokens form)."""
        stats = cls(
            calls=int(data.get("calls", 0)),
            requests=int(data.get("requests", data.get("calls", 0))),
            succeeded=int(data.get("succeeded", data.get("calls", 0) - data.get("errors", 0))),
            failed=dict(data.get("failed", {})),
            error_types=dict(data.get("error_types", {})),
            retries=int(data.get("retries", 0)),
            cache_hits=int(data.get("cache_hits", 0)),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            completions=int(data.get("completions", 0)),
        )
        if "failed" not in data and data.get("errors"):
            stats.failed = {"unknown": int(data["errors"])}
        return stats


class CallLedger:
    """An append-only file of call events (one JSON line each), so that counts survive a ``kill -9``.

    The run history is saved after every step; the ledger gets a line as each call starts and
    ends, so calls made after the last save (and calls in flight when the process died, which
    started and never ended) are still counted when the run resumes. The first line names the
    run (its fingerprint): a ledger of another run is replaced, not added to.

    Args:
        path: The file (created if needed).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = None

    def open(self, run: str) -> dict[str, CallStats] | None:
        """Start recording for the run named ``run``; returns the totals it already holds, if any."""
        totals = self._replay(run)
        if totals is None:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            self._write({"event": "header", "run": run})
            return None
        cut = self.path.read_bytes()[-1:] not in (b"", b"\n")  # a kill in the middle of a line
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if cut:
            self._file.write("\n")
        return totals

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def record(self, role: str, event: dict[str, Any]) -> None:
        self._write({**event, "role": role})

    def _write(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(event) + "\n")
                self._file.flush()  # in the OS's hands now: a killed process loses nothing written

    def _replay(self, run: str) -> dict[str, CallStats] | None:
        if not self.path.exists():
            return None
        totals: dict[str, CallStats] | None = None  # until the header names this run
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                try:
                    event = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    logger.debug("Skipping an unreadable line %d of %s", number + 1, self.path)
                    event = None
                if number == 0:
                    if event is None or event.get("event") != "header" or event.get("run") != run:
                        return None
                    totals = {}
                elif event is None:
                    continue
                elif event.get("event") == "base":
                    totals[event["role"]] = CallStats.from_dict(event["stats"])
                else:
                    totals.setdefault(str(event.get("role")), CallStats()).apply(event)
        return totals

    def write_base(self, role: str, stats: CallStats) -> None:
        """Record ``stats`` as the starting totals of ``role`` (counts carried over from a history file)."""
        self.record(role, {"event": "base", "stats": stats.as_dict()})


class CallCounter(BaseCallback):
    """Counts LM calls (a DSPy callback) and billed tokens (a DSPy usage tracker) by role, thread-safely.

    Installed with ``dspy.context(callbacks=[..., counter], usage_tracker=counter)`` (see `context`) in
    every thread that runs the program, so calls from worker threads are never lost. Usage that DSPy
    reports is also passed on to a tracker that was active before (``forward_to``).

    A call's role is the counter's ``role``; a counter made with ``role=None`` reads it from the LM
    (`tag`), ``"other"`` for an untagged LM. Each call becomes two events, applied to its role's
    `CallStats` and appended to the ``ledger`` if given: a start, and an end that says how it went —
    ``"cached"`` when DSPy answered from its cache (DSPy reports usage for every call it sends, so a
    call that succeeded without a usage report never reached the provider), ``"ok"``, or ``"failed"``
    with the `dspy_opro.faults` kind. With retries left to OPRO (`dspy_opro.calls.without_retries`),
    one call is one request.

    Args:
        stats: Where the totals of ``role`` go.
        role: The role of every call counted (``"task"``, ``"prompt"``), or ``None`` to read it from each LM.
        forward_to: A usage tracker to pass DSPy's usage reports on to.
        ledger: A `CallLedger` to append the events to.

    Attributes:
        roles: Role -> its `CallStats`.
        metric_calls: Calls of metrics wrapped by `counted`.
    """

    def __init__(
        self,
        stats: CallStats | None = None,
        *,
        role: str | None = "task",
        forward_to: Any = None,
        ledger: CallLedger | None = None,
    ):
        self.role = role
        self.roles: dict[str, CallStats] = {} if role is None else {role: stats or CallStats()}
        self.forward_to = forward_to
        self.ledger = ledger
        self.metric_calls = 0
        self._lock = threading.Lock()
        self._current = threading.local()  # this thread's call in flight: its role and reported usage

    def __deepcopy__(self, memo):
        # DSPy's parallel executor deep-copies the usage tracker; a copy must count into the same totals.
        return self

    @property
    def stats(self) -> CallStats:
        """The totals of the counter's own role (``"other"`` for a counter that reads roles from LMs)."""
        return self.of(self.role or UNTAGGED)

    def of(self, role: str) -> CallStats:
        """The totals of ``role`` (zeros when it made no call)."""
        with self._lock:
            return self.roles.setdefault(role, CallStats())

    def _per_role(self, value: Callable[[CallStats], int]) -> defaultdict[str, int]:
        with self._lock:
            return defaultdict(int, {role: value(stats) for role, stats in self.roles.items()})

    @property
    def calls(self) -> defaultdict[str, int]:
        """LM calls per role (0 for a role that made none)."""
        return self._per_role(lambda stats: stats.calls)

    @property
    def completions(self) -> defaultdict[str, int]:
        """Completions returned per role."""
        return self._per_role(lambda stats: stats.completions)

    @property
    def tokens(self) -> defaultdict[str, int]:
        """Prompt and completion tokens per role."""
        return self._per_role(lambda stats: stats.prompt_tokens + stats.completion_tokens)

    @staticmethod
    def tag(lm: Any, role: str) -> Any:
        """Mark ``lm`` (and its later copies) as a model of ``role``, for counters made with ``role=None``."""
        setattr(lm, ROLE_ATTRIBUTE, role)
        return lm

    def counted(self, metric: Callable) -> Callable:
        """``metric`` counting its calls in `metric_calls` (called as DSPy's optimizers call metrics)."""

        def counted_metric(example, prediction, trace=None):
            with self._lock:
                self.metric_calls += 1
            return metric(example, prediction, trace)

        return counted_metric

    def _event(self, role: str, event: dict[str, Any]) -> None:
        with self._lock:
            self.roles.setdefault(role, CallStats()).apply(event)
        if self.ledger is not None:
            self.ledger.record(role, event)

    def _role_of(self, instance: Any) -> str:
        return self.role or getattr(instance, ROLE_ATTRIBUTE, None) or UNTAGGED

    def on_lm_start(self, call_id, instance, inputs):
        self._current.role = self._role_of(instance)
        self._current.usage = None
        self._event(self._current.role, {"event": "start"})

    def on_lm_end(self, call_id, outputs, exception=None):
        role = getattr(self._current, "role", None) or self.role or UNTAGGED
        usage = getattr(self._current, "usage", None)
        self._current.usage = None
        tokens = {"prompt_tokens": usage[0], "completion_tokens": usage[1]} if usage else {}
        if exception is None:
            outcome = "ok" if usage is not None else "cached"
            completions = len(outputs) if isinstance(outputs, list) else int(outputs is not None)
            self._event(role, {"event": "end", "outcome": outcome, "completions": completions, **tokens})
            return
        from .faults import classify

        self._event(
            role,
            {
                "event": "end",
                "outcome": "failed",
                "kind": classify(exception),
                "type": type(exception).__name__,
                **tokens,
            },
        )

    def on_retry(self) -> None:
        """Note that a failed request of the counter's role is about to be sent again."""
        self._event(self.role or UNTAGGED, {"event": "retry"})

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        prompt = int(usage_entry.get("prompt_tokens") or 0)
        completion = int(usage_entry.get("completion_tokens") or 0)
        previous = getattr(self._current, "usage", None) or (0, 0)
        self._current.usage = (previous[0] + prompt, previous[1] + completion)
        if self.forward_to is not None:
            self.forward_to.add_usage(lm, usage_entry)

    def context(self, **overrides):
        """A ``dspy.context`` that routes this thread's LM calls through the counter."""
        callbacks = [cb for cb in dspy.settings.get("callbacks", []) or [] if cb is not self]
        return dspy.context(callbacks=[*callbacks, self], usage_tracker=self, **overrides)
