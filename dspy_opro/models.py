"""Language-model plumbing shared by the optimizers: resolving model specs and counting calls."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

logger = logging.getLogger(__name__)


def _served_by_dspy(model: str) -> bool:
    """Whether DSPy's own client routes ``model`` (offline; no litellm import, no call)."""
    try:
        from dspy.clients.backend_selection import select_backend

        return select_backend(dspy.LM(model)).native
    except Exception:  # an internal DSPy change, or a string DSPy refuses: let litellm judge it
        return False


def check_model_string(model: str) -> None:
    """Raise a clear `ValueError` if neither DSPy's client nor litellm can route ``model``; spends no LM call.

    DSPy's own routing is asked first: importing litellm takes seconds, which a model DSPy serves
    natively never needs.
    """
    if _served_by_dspy(model):
        return
    import litellm

    quiet = litellm.suppress_debug_info
    litellm.suppress_debug_info = True  # litellm prints a provider list to stdout otherwise
    try:
        litellm.get_llm_provider(model)
    except Exception as exc:
        raise ValueError(
            f"Unknown model {model!r}: neither DSPy nor litellm can tell which provider serves it. Use "
            "'<provider>/<model>', e.g. 'openai/gpt-4o-mini', 'anthropic/claude-3-5-haiku-latest', "
            "'ollama_chat/llama3', or 'local/smollm2' for the embedded model, or pass a dspy.LM."
        ) from exc
    finally:
        litellm.suppress_debug_info = quiet


# A finite wait for every string-built model: litellm's own default is 6,000 s, so a stalled provider would
# hang a run for hours. Slower models can be given as a dspy.LM with their own ``timeout``.
REQUEST_TIMEOUT_S = 120.0


def resolve_lm(spec: Any, *, role: str) -> dspy.BaseLM | None:
    """Turn a user's model spec into an LM.

    A model string becomes ``dspy.LM(spec, timeout=REQUEST_TIMEOUT_S)`` with DSPy's default engine
    (``"auto"``): providers that DSPy serves natively (OpenAI, Anthropic, Gemini, Ollama, ...) fail at
    once with DSPy's own configuration errors ("no API key found ... set OPENAI_API_KEY") and bound
    every wait, and everything else (the embedded ``local/`` models among them) goes through litellm.

    Args:
        spec: ``None`` (decided later), a `dspy.BaseLM`, or a litellm model string such as
            ``"openai/gpt-4o-mini"``.
        role: The argument name, for error messages.
    """
    if spec is None or isinstance(spec, dspy.BaseLM):
        return spec
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"{role} is an empty string; pass a litellm model string or a dspy.LM")
        check_model_string(spec)
        return dspy.LM(spec, timeout=REQUEST_TIMEOUT_S)
    raise TypeError(f"{role} must be a dspy.LM or a litellm model string, got {type(spec).__name__}")


def is_local_model(model: Any) -> bool:
    """Whether ``model`` (a model string or an LM) is one of the embedded ``local/`` models."""
    from .local._registration import PROVIDER

    name = model if isinstance(model, str) else str(getattr(model, "model", ""))
    return name.startswith(f"{PROVIDER}/")


def meta_prompt_family(model: Any) -> str:
    """The meta-prompt family that works for a prompt model: the one rule behind ``"auto"``.

    ``"base"`` (a scored list continued as a plain text completion) for the embedded local models and
    for any text-completion LM (``model_type="text"``): a small model proposes far more usable text
    when it continues a list than when it is asked in words. ``"chat"`` for every other model.
    Instruction OPRO (`dspy_opro.OPRO`) and numeric OPRO (`dspy_opro.numeric.optimize`) both use it.

    Args:
        model: A litellm model string or an LM.

    Returns:
        ``"base"`` or ``"chat"``.
    """
    text = not isinstance(model, str) and getattr(model, "model_type", None) == "text"
    return "base" if text or is_local_model(model) else "chat"


LOCAL_MAX_TOKENS = 512


def optimizer_model(
    spec: str, *, family: str = "auto", max_tokens: int | None = LOCAL_MAX_TOKENS
) -> tuple[dspy.BaseLM, str]:
    """The prompt (optimizer) model for a litellm model string, with the meta-prompt family to use.

    ``"auto"`` resolves with `meta_prompt_family`. A ``"base"`` model is a text-completion LM that
    sends the meta-prompt unchanged (`dspy_opro.local.text_lm`); the others are chat LMs.

    Args:
        spec: A litellm model string, e.g. ``"local/smollm2"`` or ``"openai/gpt-4o-mini"``.
        family: ``"auto"``, ``"chat"``, ``"paper"`` or ``"base"``.
        max_tokens: Longest reply; ``None`` keeps the provider's default for remote chat models
            (local and text-completion models always get a cap, `LOCAL_MAX_TOKENS` by default).

    Returns:
        The LM and the resolved family.
    """
    from .local import is_generator, local_lm, text_lm

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the prompt model must be a litellm model string such as 'local/smollm2', got {spec!r}")
    if family == "auto":
        family = meta_prompt_family(spec)
    if family not in ("chat", "paper", "base"):
        raise ValueError(f"family must be 'auto', 'chat', 'paper' or 'base', got {family!r}")
    model_type = "text" if family == "base" else "chat"
    capped = LOCAL_MAX_TOKENS if max_tokens is None else max_tokens
    if is_local_model(spec):
        generator = is_generator(spec.split("/", 1)[1])  # a Python generator has no model file to check
        return local_lm(spec, model_type=model_type, max_tokens=capped, check=not generator), family
    if family == "base":
        check_model_string(spec)
        return text_lm(spec, max_tokens=capped), family
    lm = resolve_lm(spec, role="prompt_model")
    return (lm if max_tokens is None else lm.copy(max_tokens=max_tokens)), family


def lm_name(lm: dspy.BaseLM | None) -> str | None:
    """A printable, secret-free name for an LM (its model string)."""
    return None if lm is None else str(getattr(lm, "model", type(lm).__name__))


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
    """Counts one role's LM calls (a DSPy callback) and billed tokens (a DSPy usage tracker), thread-safely.

    Installed with ``dspy.context(callbacks=[..., counter], usage_tracker=counter)`` in every
    thread that runs the program, so calls from worker threads are never lost. Usage that
    DSPy reports is also passed on to a tracker that was active before (``forward_to``).

    Each call becomes two events, applied to ``stats`` and appended to the ``ledger`` if given: a
    start, and an end that says how it went — ``"cached"`` when DSPy answered from its cache
    (DSPy reports usage for every call it sends, so a call that succeeded without a usage report
    never reached the provider), ``"ok"``, or ``"failed"`` with the `dspy_opro.faults` kind.
    With retries left to OPRO (`dspy_opro.calls.without_retries`), one call is one request.

    Args:
        stats: Where the totals go.
        forward_to: A usage tracker to pass DSPy's usage reports on to.
        ledger: A `CallLedger` to append the events to.
        role: The role's name in the ledger (``"task"``, ``"prompt"``).
    """

    def __init__(
        self,
        stats: CallStats | None = None,
        *,
        forward_to: Any = None,
        ledger: CallLedger | None = None,
        role: str = "task",
    ):
        self.stats = stats or CallStats()
        self.forward_to = forward_to
        self.ledger = ledger
        self.role = role
        self._lock = threading.Lock()
        self._current = threading.local()  # the usage reported for this thread's call in flight

    def _event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.stats.apply(event)
        if self.ledger is not None:
            self.ledger.record(self.role, event)

    def on_lm_start(self, call_id, instance, inputs):
        self._current.usage = None
        self._event({"event": "start"})

    def on_lm_end(self, call_id, outputs, exception=None):
        usage = getattr(self._current, "usage", None)
        self._current.usage = None
        tokens = {"prompt_tokens": usage[0], "completion_tokens": usage[1]} if usage else {}
        if exception is None:
            self._event({"event": "end", "outcome": "ok" if usage is not None else "cached", **tokens})
            return
        from .faults import classify

        self._event(
            {
                "event": "end",
                "outcome": "failed",
                "kind": classify(exception),
                "type": type(exception).__name__,
                **tokens,
            }
        )

    def on_retry(self) -> None:
        """Note that a failed request is about to be sent again."""
        self._event({"event": "retry"})

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


@dataclass
class Counts:
    """Everything a run has spent and discarded; saved with the run history.

    ``metric_calls`` counts scored (program, example) pairs: the runs that gave a score, which is
    what ``max_metric_calls`` caps; ``task_failures`` the runs that failed (after their retries).
    """

    metric_calls: int = 0
    task_failures: int = 0
    task: CallStats = field(default_factory=CallStats)
    prompt: CallStats = field(default_factory=CallStats)
    proposals: int = 0
    unparsed: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric_calls": self.metric_calls,
            "task_failures": self.task_failures,
            "task_lm": self.task.as_dict(),
            "prompt_lm": self.prompt.as_dict(),
            "proposals": self.proposals,
            "unparsed": self.unparsed,
            "duplicates": self.duplicates,
            "rejected": dict(self.rejected),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counts:
        return cls(
            metric_calls=data.get("metric_calls", 0),
            task_failures=data.get("task_failures", 0),
            task=CallStats.from_dict(data.get("task_lm", {})),
            prompt=CallStats.from_dict(data.get("prompt_lm", {})),
            proposals=data.get("proposals", 0),
            unparsed=data.get("unparsed", 0),
            duplicates=data.get("duplicates", 0),
            rejected=dict(data.get("rejected", {})),
        )


def rollout_id(*key: object) -> int:
    """A stable integer id for one sample, derived from ``key`` (e.g. seed, step, sample index).

    DSPy keys its cache on the rollout id, so samples with distinct ids are independent even
    with the cache on, and a rerun with the same key replays the same sample from the cache.
    """
    raw = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return int.from_bytes(raw[:6], "big")


def sample_one(
    lm: dspy.BaseLM,
    prompt: str,
    sample: int,
    *,
    temperature: float,
    key: Sequence[object],
    counter: CallCounter | None = None,
    stop: Sequence[str] | None = None,
) -> str:
    """One reply of ``lm`` to ``prompt``: sample number ``sample``, with its own rollout id (``key`` plus ``sample``).

    Distinct rollout ids keep samples independent at ``temperature > 0`` even with DSPy's cache
    on, and a rerun with the same key replays the same sample from the cache.
    """
    overrides: dict[str, Any] = {"temperature": temperature}
    if temperature > 0:  # DSPy warns about a rollout id at temperature 0, where it changes nothing
        overrides["rollout_id"] = rollout_id(*key, sample)
    sampler = lm.copy(**overrides)
    kwargs = {"stop": list(stop)} if stop else {}
    with counter.context() if counter is not None else dspy.context():
        outputs = sampler(prompt, **kwargs)
    first = outputs[0] if outputs else ""
    return (first.get("text") or "") if isinstance(first, dict) else str(first or "")


def sample_replies(
    lm: dspy.BaseLM,
    prompt: str,
    n: int,
    *,
    temperature: float,
    key: Sequence[object],
    counter: CallCounter | None = None,
    stop: Sequence[str] | None = None,
    num_threads: int = 1,
) -> list[str | Exception]:
    """``n`` independent replies of ``lm`` to ``prompt`` (`sample_one` for samples 0..n-1), in parallel threads.

    A sample whose call raises is returned as the exception, in its position, so one failure
    never loses the other replies. Retries are the LM's own (DSPy's ``num_retries``).
    """
    from .calls import run_jobs

    jobs = [
        functools.partial(sample_one, lm, prompt, j, temperature=temperature, key=key, counter=counter, stop=stop)
        for j in range(n)
    ]
    outcomes = run_jobs(
        jobs, num_threads=num_threads, retries=0, on_outcome=lambda i, o: False, lms=[lm], name="opro-sample"
    )
    return [o.value if o.ok else o.error for o in outcomes]
