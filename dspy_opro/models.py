"""Language-model plumbing shared by the optimizers: resolving model specs and counting calls."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

logger = logging.getLogger(__name__)


def check_model_string(model: str) -> None:
    """Raise a clear `ValueError` if litellm cannot route ``model``; spends no LM call."""
    import litellm

    quiet = litellm.suppress_debug_info
    litellm.suppress_debug_info = True  # litellm prints a provider list to stdout otherwise
    try:
        litellm.get_llm_provider(model)
    except Exception as exc:
        raise ValueError(
            f"Unknown model {model!r}: litellm cannot tell which provider serves it. Use "
            "'<provider>/<model>', e.g. 'openai/gpt-4o-mini', 'anthropic/claude-3-5-haiku-latest', "
            "'ollama_chat/llama3', or 'local/smollm2' for the embedded model, or pass a dspy.LM."
        ) from exc
    finally:
        litellm.suppress_debug_info = quiet


def resolve_lm(spec: Any, *, role: str) -> dspy.BaseLM | None:
    """Turn a user's model spec into an LM.

    Args:
        spec: ``None`` (decided later), a `dspy.BaseLM`, or a litellm model string such as
            ``"openai/gpt-4o-mini"``, which becomes ``dspy.LM(spec, engine="litellm")``.
        role: The argument name, for error messages.
    """
    if spec is None or isinstance(spec, dspy.BaseLM):
        return spec
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"{role} is an empty string; pass a litellm model string or a dspy.LM")
        check_model_string(spec)
        return dspy.LM(spec, engine="litellm")
    raise TypeError(f"{role} must be a dspy.LM or a litellm model string, got {type(spec).__name__}")


def lm_name(lm: dspy.BaseLM | None) -> str | None:
    """A printable, secret-free name for an LM (its model string)."""
    return None if lm is None else str(getattr(lm, "model", type(lm).__name__))


@dataclass
class CallStats:
    """Calls and tokens spent through one role (task model or prompt model)."""

    calls: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


class CallCounter(BaseCallback):
    """Counts LM calls (a DSPy callback) and billed tokens (a DSPy usage tracker), thread-safely.

    Installed with ``dspy.context(callbacks=[..., counter], usage_tracker=counter)`` in every
    thread that runs the program, so calls from worker threads are never lost. Usage that
    DSPy reports is also passed on to a tracker that was active before (``forward_to``).
    """

    def __init__(self, stats: CallStats | None = None, *, forward_to: Any = None):
        self.stats = stats or CallStats()
        self.forward_to = forward_to
        self._lock = threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        with self._lock:
            self.stats.calls += 1

    def on_lm_end(self, call_id, outputs, exception=None):
        if exception is not None:
            with self._lock:
                self.stats.errors += 1

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        with self._lock:
            self.stats.prompt_tokens += int(usage_entry.get("prompt_tokens") or 0)
            self.stats.completion_tokens += int(usage_entry.get("completion_tokens") or 0)
        if self.forward_to is not None:
            self.forward_to.add_usage(lm, usage_entry)

    def context(self, **overrides):
        """A ``dspy.context`` that routes this thread's LM calls through the counter."""
        callbacks = [cb for cb in dspy.settings.get("callbacks", []) or [] if cb is not self]
        return dspy.context(callbacks=[*callbacks, self], usage_tracker=self, **overrides)


@dataclass
class Counts:
    """Everything a run has spent and discarded; saved with the run history."""

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
            task=CallStats(**data.get("task_lm", {})),
            prompt=CallStats(**data.get("prompt_lm", {})),
            proposals=data.get("proposals", 0),
            unparsed=data.get("unparsed", 0),
            duplicates=data.get("duplicates", 0),
            rejected=dict(data.get("rejected", {})),
        )
