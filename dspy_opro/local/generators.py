"""Python functions served as local models: ``register_generator(name, fn)`` makes ``fn`` the model ``local/<name>``.

A generator receives a `GenerationRequest` (the chat messages or the raw prompt, with the sampling values
resolved as for a GGUF model) and returns the text, or a `Generation` with its own token counts and finish
reason. `call_generator` runs it for the litellm provider: ``n`` choices, the text cut at the first stop
string, usage filled in. See `register_generator`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dspy_opro.local import names
from dspy_opro.local.completion import Choice, Completion, CompletionCall, GeneratorError, ModelNotFoundError
from dspy_opro.local.names import generator_names


@dataclass(frozen=True)
class GenerationRequest:
    """One completion asked of a registered generator (see `register_generator`).

    Exactly one of ``messages`` and ``prompt`` is set. Sampling values are resolved: a call that did
    not give ``temperature`` or ``max_tokens`` gets the same defaults as a GGUF model.

    Attributes:
        messages: The chat messages, each ``{"role": ..., "content": <text>}``, for a chat completion.
        prompt: The text to continue, for a text completion.
        temperature: 0 asks for greedy decoding; 1.0 when the call did not say.
        max_tokens: Most tokens to write, counted in the generator's own units; 256 when the call did not say.
        stop: Strings that end the completion. The provider cuts the returned text at the first of them
            anyway, so a generator honours them only to save work.
        seed: This choice's seed: the call's ``seed`` plus `index`, or None (sample afresh).
        index: Which of the call's ``n`` choices this is, from 0.
        options: The call's other sampling parameters (``top_p``, ``top_k``, ...), read-only.
    """

    messages: tuple[dict[str, str], ...] | None
    prompt: str | None
    temperature: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None = None
    index: int = 0
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def system(self) -> str:
        """The text of the system messages joined by newlines; ``""`` when there is none."""
        return "\n".join(m["content"] for m in self.messages or () if m["role"] == "system")

    @property
    def user(self) -> str:
        """The text of the last user message, or the prompt of a text completion."""
        if self.prompt is not None:
            return self.prompt
        return next((m["content"] for m in reversed(self.messages or ()) if m["role"] == "user"), "")

    @property
    def text(self) -> str:
        """The whole input as one text: the prompt, or the contents of all messages joined by blank lines."""
        if self.prompt is not None:
            return self.prompt
        return "\n\n".join(m["content"] for m in self.messages or ())


@dataclass(frozen=True)
class Generation:
    """A generator's reply with its own token counts; a generator may return a plain string instead.

    Attributes:
        text: The completion.
        prompt_tokens: Tokens of the input; None: counted with the registration's ``count_tokens``.
        completion_tokens: Tokens written; None: counted likewise.
        finish_reason: ``"stop"`` (finished) or ``"length"`` (``max_tokens`` reached); None means ``"stop"``.
    """

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


GeneratorFn = Callable[[GenerationRequest], "str | Generation"]


def count_words(text: str) -> int:
    """Whitespace-separated words: the default token count of generators that do not report their own."""
    return len(text.split())


@dataclass(frozen=True)
class _Generator:
    fn: GeneratorFn
    count_tokens: Callable[[str], int]
    slots: threading.BoundedSemaphore | None

    def slot(self) -> contextlib.AbstractContextManager[Any]:
        return self.slots if self.slots is not None else contextlib.nullcontext()


def register_generator(
    name: str,
    fn: GeneratorFn,
    *,
    max_concurrency: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> None:
    """Serve a Python function as the model ``local/<name>`` (chat and text completions).

    ``fn(request)`` receives a `GenerationRequest` (the chat messages or the raw prompt, and the
    sampling parameters) and returns the completion as a string, or as a `Generation` to report its
    own token counts and finish reason. A call with ``n > 1`` calls ``fn`` ``n`` times, choice ``i``
    with seed ``seed + i``. The provider cuts the text at the first stop string and fills ``usage``.

    A ``ValueError`` raised by ``fn`` rejects the request (litellm's ``BadRequestError``, not
    retried); any other exception is a server error (litellm's ``InternalServerError``). Both carry
    the generator's name and message.

    Registering a name again replaces its generator. Names share one namespace with `register_model`.

    Args:
        name: The short name: non-empty, no ``/``, not ending in ``.gguf``, not a GGUF model's name.
        fn: The generator. It is called from the caller's thread, so from several threads at once when
            DSPy evaluates in parallel, unless ``max_concurrency`` says otherwise.
        max_concurrency: Most calls of ``fn`` running at once (1 serialises them); None: no limit.
        count_tokens: Counts the tokens of a text for ``usage`` when ``fn`` returns a string or leaves a
            count out; default `count_words`.

    Example:
        >>> register_generator("shout", lambda request: request.user.upper())
        >>> litellm.completion(model="local/shout", messages=[{"role": "user", "content": "hi"}])
    """
    names.check_name(name)
    if not callable(fn):
        raise TypeError(f"A generator must be callable as fn(request), got {type(fn).__name__}")
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
    ):
        raise ValueError(f"max_concurrency must be a positive integer or None, got {max_concurrency!r}")
    if count_tokens is not None and not callable(count_tokens):
        raise TypeError(f"count_tokens must be callable as count_tokens(text), got {type(count_tokens).__name__}")
    entry = _Generator(
        fn=fn,
        count_tokens=count_tokens or count_words,
        slots=None if max_concurrency is None else threading.BoundedSemaphore(max_concurrency),
    )
    names.add_generator(name, entry)


def unregister_generator(name: str) -> bool:
    """Forget the generator ``name``; calls in flight finish normally.

    Args:
        name: A name given to `register_generator`.

    Returns:
        Whether such a generator was registered.
    """
    return names.remove_generator(name)


def _text_messages(messages: Sequence[Any]) -> tuple[dict[str, str], ...]:
    # Copies, so that a generator cannot change the caller's messages; OpenAI-style content parts
    # are flattened to their text.
    result = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"A chat message must be a mapping with a 'role', got {message!r}")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, Sequence) and all(
            isinstance(part, Mapping) and part.get("type") == "text" for part in content
        ):
            text = "".join(str(part.get("text", "")) for part in content)
        else:
            raise ValueError(f"A generator takes text messages only; a {message['role']} message holds {content!r}")
        result.append({"role": str(message["role"]), "content": text})
    return tuple(result)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    ends = [text.find(stop) for stop in stops]
    ends = [end for end in ends if end >= 0]
    if not ends:
        return text, False
    return text[: min(ends)], True


def _read_reply(name: str, reply: Any) -> Generation:
    if isinstance(reply, str):
        return Generation(reply)
    if not isinstance(reply, Generation) or not isinstance(reply.text, str):
        raise GeneratorError(
            f"The generator {name!r} returned {type(reply).__name__}; it must return a str or a "
            "dspy_opro.local.Generation whose text is a str."
        )
    for key in ("prompt_tokens", "completion_tokens"):
        value = getattr(reply, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise GeneratorError(f"The generator {name!r} returned {key}={value!r}; expected a count >= 0 or None.")
    if reply.finish_reason not in (None, "stop", "length"):
        raise GeneratorError(
            f"The generator {name!r} returned finish_reason={reply.finish_reason!r}; expected 'stop', 'length' or None."
        )
    return reply


def call_generator(name: str, **call: Any) -> Completion:
    """Run the generator ``name`` once per choice on a chat (``messages``) or a raw text (``prompt``).

    Args:
        name: A name given to `register_generator`.
        **call: The call's keywords, as `dspy_opro.local.completion.CompletionCall.of` takes them: ``messages``
            (text content only) or ``prompt``, ``n`` (one call of the generator each), ``temperature``,
            ``max_tokens``, ``stop`` (the text is cut before the first one found), ``seed`` (choice ``i`` gets
            ``seed + i``), and other sampling parameters, passed on read-only.

    Returns:
        The choices and their token usage (the prompt counted once).

    Raises:
        ModelNotFoundError: No generator has this name.
        ValueError: Bad arguments.
        GeneratorError: The generator raised (its exception is the cause) or returned a wrong value.
    """
    entry = names.generator(name)
    if entry is None:
        raise ModelNotFoundError(
            f"No generator named {name!r}; registered generators: {', '.join(generator_names()) or 'none'}."
        )
    request = CompletionCall.of(**call)
    chat = None if request.messages is None else _text_messages(request.messages)
    if request.prompt is not None and not isinstance(request.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(request.prompt).__name__}")
    stops = tuple(s for s in request.stop if s)
    result = Completion()
    for index in range(request.n):
        asked = GenerationRequest(
            messages=chat,
            prompt=request.prompt,
            temperature=request.temperature,
            max_tokens=request.max_tokens,
            stop=stops,
            seed=request.choice_seed(index),
            index=index,
            options=request.options,
        )
        try:
            with entry.slot():
                raw = entry.fn(asked)
        except Exception as exc:
            raise GeneratorError(f"The generator {name!r} failed: {type(exc).__name__}: {exc}") from exc
        reply = _read_reply(name, raw)
        text, stopped = _cut_at_stop(reply.text, stops)
        if index == 0:
            result.prompt_tokens = (
                reply.prompt_tokens if reply.prompt_tokens is not None else entry.count_tokens(asked.text)
            )
        # A generator's own count stands even when a stop string cut the text: it wrote those tokens.
        result.completion_tokens += (
            reply.completion_tokens if reply.completion_tokens is not None else entry.count_tokens(text)
        )
        result.choices.append(Choice(text, "stop" if stopped else reply.finish_reason or "stop"))
    return result
