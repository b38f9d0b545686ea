"""What every local model is asked and returns, GGUF model or Python generator: errors, calls, completions.

A call (`CompletionCall`) holds a chat (``messages``) or a raw text (``prompt``), ``n`` choices and the
sampling values, checked and with the defaults filled in once for both kinds of model; a `Completion`
holds the choices and their token counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

INSTALL_HINT = "install the `local` extra: pip install 'dspy-opro[local]'"

# Defaults when a call does not say. temperature follows the OpenAI API (1.0).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 256


class LocalModelError(Exception):
    """Base class of the errors raised by the local models."""


class ModelNotFoundError(LocalModelError, FileNotFoundError):
    """The model name is unknown or its GGUF file does not exist."""


class LlamaCppNotInstalledError(LocalModelError, ImportError):
    """`llama-cpp-python` is not installed."""


class ContextWindowError(LocalModelError, ValueError):
    """The prompt plus the requested completion does not fit in the model's context window."""


class GeneratorError(LocalModelError, RuntimeError):
    """A registered generator raised, or returned something other than a string or a `Generation`.

    The generator's own exception, if any, is the ``__cause__``.
    """


@dataclass(frozen=True)
class CompletionCall:
    """One call to a local model, checked, with the defaults filled in.

    Attributes:
        messages: OpenAI-style chat messages, for a chat completion (exclusive with ``prompt``).
        prompt: The text to continue exactly as given, for a text completion.
        n: Number of independent completions.
        temperature: 0 decodes greedily; `DEFAULT_TEMPERATURE` when the call did not say.
        max_tokens: Most tokens per completion; `DEFAULT_MAX_TOKENS` when the call did not say.
        stop: Strings that end a completion; they are not included in the text.
        seed: Makes sampling reproducible: choice ``i`` uses ``seed + i``. ``None``: every choice samples afresh.
        options: The other sampling parameters (``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ...).
    """

    messages: Sequence[Mapping[str, Any]] | None
    prompt: str | None
    n: int = 1
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(
        cls,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | None = None,
        n: int = 1,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> CompletionCall:
        """The call for these keywords (see the attributes); a `ValueError` says what is wrong."""
        if (messages is None) == (prompt is None):
            raise ValueError("Pass exactly one of messages= or prompt=")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if max_tokens is not None and int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens!r}")
        if temperature is not None and float(temperature) < 0:
            raise ValueError(f"temperature must be at least 0, got {temperature!r}")
        return cls(
            messages=None if messages is None else list(messages),
            prompt=prompt,
            n=n,
            temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens),
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            seed=None if seed is None else int(seed),
            options=MappingProxyType(dict(options)),
        )

    def choice_seed(self, index: int) -> int | None:
        """The seed of choice ``index``: ``seed + index``, or ``None`` when the call has no seed."""
        return None if self.seed is None else self.seed + index


@dataclass
class Choice:
    """One sampled completion."""

    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (max_tokens reached)


@dataclass
class Completion:
    """The result of one call: ``n`` choices and token counts (the prompt counted once)."""

    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
