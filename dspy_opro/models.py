"""Language-model plumbing shared by the optimizers: resolving model specs and counting calls."""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


def rollout_id(*key: object) -> int:
    """A stable integer id for one sample, derived from ``key`` (e.g. seed, step, sample index).

    DSPy keys its cache on the rollout id, so samples with distinct ids are independent even
    with the cache on, and a rerun with the same key replays the same sample from the cache.
    """
    raw = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return int.from_bytes(raw[:6], "big")


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
    """``n`` independent replies of ``lm`` to ``prompt``, sampled in parallel threads.

    Each sample is a separate call with its own rollout id (``key`` plus the sample index),
    so replies differ at ``temperature > 0`` even with DSPy's cache on. A sample whose call
    raises is returned as the exception, in its position, so one failure never loses the
    other replies.
    """

    def one(sample: int) -> str | Exception:
        overrides: dict[str, Any] = {"temperature": temperature}
        if temperature > 0:  # DSPy warns about a rollout id at temperature 0, where it changes nothing
            overrides["rollout_id"] = rollout_id(*key, sample)
        sampler = lm.copy(**overrides)
        kwargs = {"stop": list(stop)} if stop else {}
        try:
            with counter.context() if counter is not None else dspy.context():
                outputs = sampler(prompt, **kwargs)
        except Exception as exc:
            return exc
        first = outputs[0] if outputs else ""
        return (first.get("text") or "") if isinstance(first, dict) else str(first or "")

    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, n)), thread_name_prefix="opro-sample") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, j) for j in range(n)]
        return [future.result() for future in futures]
