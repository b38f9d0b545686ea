"""``dspy.LM`` constructors for the local provider, and raw text completions in DSPy.

Why a custom engine for text. In DSPy 3.4 an LM built with ``model_type="text"`` and
``engine="litellm"`` (or ``"auto"``) does not send the prompt as written: its text path
(``dspy.clients.lm.litellm_text_completion``) rewrites the model to
``text-completion-openai/<name>``, which targets an OpenAI-compatible server and never reaches a
custom provider, and appends ``"\\n\\nBEGIN RESPONSE:"`` to the prompt. `TextCompletionEngine`
is a DSPy engine (``complete(Request) -> Response``, DSPy 3.4's extension point) that calls
``litellm.text_completion`` with the model string unchanged and the prompt exactly as given. DSPy
still owns caching (``rollout_id`` is part of the key), retries, history and callbacks.

`text_lm` builds such an LM for any litellm model string; `local_lm` builds chat or text LMs for
the local provider; `is_text_lm` tells a text-completion LM from a chat LM.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import warnings
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage

from dspy_opro.local import gguf
from dspy_opro.local._registration import register
from dspy_opro.local.completion import INSTALL_HINT, LlamaCppNotInstalledError
from dspy_opro.local.names import DEFAULT_MODEL, PROVIDER, is_local_model, model_part

logger = logging.getLogger(__name__)

try:  # DSPy's own mapping of litellm errors (retryable or not, context-window, ...).
    from dspy.clients.engines.litellm_errors import litellm_errors as _litellm_errors
except ImportError:  # pragma: no cover - only on a DSPy without this module
    import contextlib

    def _litellm_errors(**_: Any) -> Any:
        return contextlib.nullcontext()


def _litellm() -> Any:
    # Through DSPy's loader when it has one, so litellm gets DSPy's defaults (no telemetry, no
    # litellm cache, no debug banners) exactly as for DSPy's own engines.
    try:
        from dspy.clients._litellm import get_litellm
    except ImportError:  # pragma: no cover - only on a DSPy without this module
        import litellm

        return litellm
    return get_litellm(feature="dspy_opro.local.TextCompletionEngine")


_FINISH_REASONS = {"stop": "stop", "length": "length", "content_filter": "content_filter"}


def request_prompt(request: Request) -> str:
    """The text a text-completion engine sends for a DSPy request.

    A plain ``lm("...")`` call holds one user message, whose text is the prompt as given. Several
    messages (a system message, an adapter's turns) are joined with blank lines, without roles.

    Args:
        request: The canonical request DSPy hands to an engine.

    Returns:
        The prompt text.
    """
    texts: list[str] = []
    if request.system:
        system = request.system
        texts.append(system if isinstance(system, str) else "".join(getattr(part, "text", "") for part in system))
    for message in request.messages:
        for part in message.parts:
            if not isinstance(part, TextPart):
                raise dspy.lm15.UnsupportedFeatureError(
                    f"A text completion takes text only, got a {type(part).__name__} in a {message.role} message."
                )
        texts.append("".join(part.text for part in message.parts))
    return "\n\n".join(texts)


class TextCompletionEngine:
    """DSPy engine that sends a request's text to ``litellm.text_completion`` unchanged.

    Use it through `text_lm`, or directly:
    ``dspy.LM("local/smollm2", model_type="text", engine=TextCompletionEngine(), async_engine=AsyncTextCompletionEngine())``.
    Each call yields one completion; ``n=k`` makes DSPy call the engine k times with the same
    settings, so give each sample its own ``rollout_id`` (and no fixed ``seed``) for distinct samples.

    Args:
        api_base: Server address for remote text-completion models (not needed for ``local/``).
        api_key: Credential for remote models. Not saved by `dump_state`.
        provider_params: Extra keywords sent with every call, for settings DSPy's request does not
            carry (e.g. ``{"min_p": 0.1, "concurrency": "lock"}`` for the local provider).
    """

    def __init__(
        self, *, api_base: str | None = None, api_key: str | None = None, provider_params: dict[str, Any] | None = None
    ):
        self.api_base = api_base
        self.api_key = api_key
        self.provider_params = dict(provider_params or {})

    def _arguments(self, request: Request) -> dict[str, Any]:
        config = request.config
        if config.response_format is not None or config.tool_choice is not None or request.tools:
            raise dspy.lm15.UnsupportedFeatureError("A text completion has no tools or response formats.")
        arguments: dict[str, Any] = {
            "model": request.model,
            "prompt": request_prompt(request),
            "num_retries": 0,  # DSPy owns retries
            **self.provider_params,
        }
        for key in ("temperature", "max_tokens", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(config, key)
            if value is not None:
                arguments[key] = value
        if config.stop:
            arguments["stop"] = list(config.stop)
        if config.extensions:
            arguments.update(config.extensions)
        if self.api_base is not None:
            arguments["api_base"] = self.api_base
        if self.api_key is not None:
            arguments["api_key"] = self.api_key
        return arguments

    def complete(self, request: Request) -> Response:
        """Run one text completion.

        Args:
            request: The canonical request built by ``dspy.LM``.

        Returns:
            One response whose text is the continuation (stop strings excluded).
        """
        litellm = _litellm()
        register()  # a no-op once registered; covers a litellm imported before dspy_opro
        arguments = self._arguments(request)
        with _litellm_errors(model=request.model):
            raw = litellm.text_completion(**arguments)
        choice = raw.choices[0]
        usage = getattr(raw, "usage", None)
        return Response(
            id=getattr(raw, "id", None) or None,
            model=getattr(raw, "model", None) or request.model,
            message=Message(role="assistant", parts=(TextPart(text=choice.text or ""),)),
            finish_reason=_FINISH_REASONS.get(choice.finish_reason, "stop"),
            usage=Usage(
                input_tokens=getattr(usage, "prompt_tokens", None),
                output_tokens=getattr(usage, "completion_tokens", None),
            ),
        )

    def close(self) -> None:
        """Nothing to release: litellm's clients are shared, GGUF models are cached by `dspy_opro.local.gguf`."""

    def dump_state(self) -> dict[str, Any]:
        """Settings for `load_state` (never the API key)."""
        return {"api_base": self.api_base, "provider_params": self.provider_params}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> TextCompletionEngine:
        """Rebuild an engine from `dump_state`."""
        return cls(api_base=state.get("api_base"), provider_params=state.get("provider_params"))


class AsyncTextCompletionEngine(TextCompletionEngine):
    """Async counterpart of `TextCompletionEngine` (for ``await lm.acall(...)``): runs it in a worker thread."""

    async def complete(self, request: Request) -> Response:  # type: ignore[override]
        """Run one text completion without blocking the event loop."""
        return await asyncio.to_thread(TextCompletionEngine.complete, self, request)

    async def aclose(self) -> None:
        """Nothing to release."""


def text_lm(
    model: str = f"{PROVIDER}/{DEFAULT_MODEL}",
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    provider_params: dict[str, Any] | None = None,
    **lm_kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` that continues prompts as raw text (``model_type="text"``).

    ``lm(prompt, stop=[...], ...)`` returns a list of strings, each a continuation of exactly
    ``prompt``: no chat template, no added text.

    Args:
        model: Any litellm model string that supports text completion, e.g. ``"local/smollm2"``.
        api_base: Server address for remote models.
        api_key: Credential for remote models.
        provider_params: Extra keywords for every call (see `TextCompletionEngine`).
        **lm_kwargs: ``dspy.LM`` arguments: ``temperature``, ``max_tokens``, ``cache``, ``num_retries``, ...

    Returns:
        The LM.
    """
    if is_local_model(model):
        lm_kwargs.setdefault("num_retries", 0)  # nothing transient can fail in-process
    engine_args = {"api_base": api_base, "api_key": api_key, "provider_params": provider_params}
    return dspy.LM(
        model,
        model_type="text",
        engine=TextCompletionEngine(**engine_args),
        async_engine=AsyncTextCompletionEngine(**engine_args),
        **lm_kwargs,
    )


def is_text_lm(lm: Any) -> bool:
    """Whether ``lm`` is a text-completion LM (``model_type == "text"``), e.g. one from `text_lm`.

    Note that a text LM built with DSPy's own engines (``engine="litellm"``/``"auto"``) rewrites its
    prompt (see the module docstring); build text LMs with `text_lm` to send prompts unchanged.
    """
    return getattr(lm, "model_type", None) == "text"


def is_local_lm(lm: Any) -> bool:
    """Deprecated: `dspy_opro.local.is_local_model`, which takes a model string or an LM."""
    warnings.warn(
        "dspy_opro.local.is_local_lm is deprecated; use dspy_opro.local.is_local_model",
        DeprecationWarning,
        stacklevel=2,
    )
    return is_local_model(lm)


def check_available(model: str = DEFAULT_MODEL) -> None:
    """Raise the error a first call would raise if the model file or llama-cpp-python is missing.

    Args:
        model: A local model name or GGUF path (the part after ``local/``).

    Raises:
        ModelNotFoundError: The model is unknown or its file is missing.
        LlamaCppNotInstalledError: ``llama-cpp-python`` is not installed.
    """
    gguf.resolve_model_path(model)
    if importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppNotInstalledError(
            f"The local model needs `llama-cpp-python`, which is not installed; {INSTALL_HINT}"
        )


def local_lm(
    model: str = DEFAULT_MODEL,
    *,
    model_type: str = "chat",
    check: bool = True,
    **lm_kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` on a local GGUF model, served in-process through litellm.

    Args:
        model: ``"smollm2"``, a name given to `register_model`, a GGUF path, or the full model string
            (``"local/..."``).
        model_type: ``"chat"`` (the model's chat template) or ``"text"`` (raw continuations, see `text_lm`).
        check: Fail now, with the fix in the message, if the model file or llama-cpp-python is missing.
        **lm_kwargs: ``dspy.LM`` arguments (``temperature``, ``max_tokens``, ``cache``, ...). Load settings
            (``concurrency``, ``pool_size``, ``n_threads``, ``n_ctx``) and the sampling settings
            ``min_p`` and ``repeat_penalty`` are accepted for chat LMs and sent with every call.

    Returns:
        The LM. ``num_retries`` defaults to 0: an in-process call has no transient failures.
    """
    name = model_part(model)
    if check:
        check_available(name)
    register()
    lm_kwargs.setdefault("num_retries", 0)
    if model_type == "text":
        extra = {
            key: lm_kwargs.pop(key)
            for key in ("concurrency", "pool_size", "n_threads", "n_ctx", "min_p", "repeat_penalty")
            if key in lm_kwargs
        }
        return text_lm(f"{PROVIDER}/{name}", provider_params=extra or None, **lm_kwargs)
    if model_type != "chat":
        raise ValueError(f"model_type must be 'chat' or 'text', got {model_type!r}")
    return dspy.LM(f"{PROVIDER}/{name}", engine="litellm", **lm_kwargs)
