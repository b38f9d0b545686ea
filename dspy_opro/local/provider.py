"""The litellm provider ``local``: GGUF models (`gguf`) and Python generators (`generators`) served in-process.

``litellm.completion(model="local/smollm2", messages=...)`` applies the model's chat template;
``litellm.text_completion(model="local/smollm2", prompt=...)`` continues the prompt exactly as
given. A name given to `generators.register_generator` is routed to its Python function instead, for
both kinds of call. Importing this module imports litellm; `dspy_opro.local.register` does it only
once litellm itself is imported.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import litellm
from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.utils import Choices, GenericStreamingChunk, Message, ModelResponse, Usage

from dspy_opro.local import completion, generators, gguf
from dspy_opro.local.names import PROVIDER, is_generator

logger = logging.getLogger(__name__)


# Keywords a call may carry. Sampling ones go to llama.cpp; load ones select the runtime.
SAMPLING_PARAMS = frozenset(
    {
        "temperature",
        "max_tokens",
        "stop",
        "n",
        "seed",
        "top_p",
        "top_k",
        "min_p",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
    }
)
LOAD_PARAMS = frozenset({"concurrency", "pool_size", "n_threads", "n_ctx"})
# Client settings litellm or DSPy add that mean nothing to an in-process model.
CLIENT_PARAMS = frozenset({"max_retries", "stream", "stream_options", "user", "extra_headers", "timeout"})

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_ignored(name: str, reason: str | None = None) -> None:
    with _warned_lock:
        if name in _warned:
            return
        _warned.add(name)
    if reason is None:
        reason = f"it supports {sorted(SAMPLING_PARAMS)}"
    logger.warning("The local provider ignores the parameter %r (%s).", name, reason)


def _split_params(optional_params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    sampling: dict[str, Any] = {}
    load: dict[str, Any] = {}
    for key, value in optional_params.items():
        if value is None:
            continue
        if key == "max_completion_tokens":
            sampling.setdefault("max_tokens", value)
        elif key in SAMPLING_PARAMS:
            sampling[key] = value
        elif key in LOAD_PARAMS:
            load[key] = value
        elif key not in CLIENT_PARAMS:
            _warn_ignored(key)
    return sampling, load


def _text_prompt(messages: list[dict[str, Any]]) -> str:
    # litellm.text_completion wraps its prompt as one user message.
    if len(messages) != 1:
        raise CustomLLMError(400, f"A local text completion takes one prompt string, got {len(messages)} prompts.")
    content = messages[0].get("content")
    if not isinstance(content, str):
        raise CustomLLMError(400, "A local text completion prompt must be a string.")
    return content


def run(
    model: str, messages: list[dict[str, Any]], optional_params: dict[str, Any], *, text: bool
) -> completion.Completion:
    """Generate with the runtime, turning its errors into litellm errors of the right status.

    The status decides whether callers retry: a missing file or package (404/400) is final.

    Args:
        model: The model part of the model string (after ``local/``): a GGUF name or path, or a
            registered generator's name.
        messages: The chat messages, or for a text completion one message holding the prompt.
        optional_params: The call's parameters as litellm hands them to a custom provider.
        text: Continue the prompt as raw text instead of applying the chat template.

    Returns:
        The runtime's completion.
    """
    sampling, load = _split_params(optional_params)
    try:
        if is_generator(model):
            for key in load:
                _warn_ignored(key, f"a Python generator ({model!r}) has no load settings")
            if text:
                return generators.call_generator(model, prompt=_text_prompt(messages), **sampling)
            return generators.call_generator(model, messages=messages, **sampling)
        settings = gguf.runtime_settings(model, **load)
        if text:
            return gguf.generate(settings, prompt=_text_prompt(messages), **sampling)
        return gguf.generate(settings, messages=messages, **sampling)
    except completion.GeneratorError as exc:
        # A generator that raises ValueError rejects this request (final); anything else is a server fault.
        raise CustomLLMError(400 if isinstance(exc.__cause__, ValueError) else 500, str(exc)) from exc
    except completion.ModelNotFoundError as exc:
        raise CustomLLMError(404, str(exc)) from exc
    except completion.LlamaCppNotInstalledError as exc:
        raise CustomLLMError(400, str(exc)) from exc
    except completion.ContextWindowError as exc:
        raise litellm.ContextWindowExceededError(str(exc), model=f"{PROVIDER}/{model}", llm_provider=PROVIDER) from exc
    except (TypeError, ValueError) as exc:
        raise CustomLLMError(400, f"Invalid request for the local model: {exc}") from exc


def _fill(model_response: ModelResponse, model: str, result: completion.Completion) -> ModelResponse:
    model_response.choices = [
        Choices(index=i, finish_reason=choice.finish_reason, message=Message(role="assistant", content=choice.text))
        for i, choice in enumerate(result.choices)
    ]
    model_response.model = model
    model_response.created = int(time.time())
    model_response.usage = Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.total_tokens,
    )
    return model_response


class LocalLLM(CustomLLM):
    """litellm handler for ``local/<name>`` (GGUF models and Python generators) and ``local/<path>.gguf`` models."""

    def completion(
        self,
        model: str,
        messages: list,
        api_base: str,
        custom_prompt_dict: dict,
        model_response: ModelResponse,
        print_verbose: Any,
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict,
        acompletion: Any = None,
        litellm_params: dict | None = None,
        logger_fn: Any = None,
        headers: Any = None,
        timeout: Any = None,
        client: Any = None,
    ) -> ModelResponse:
        text = bool((litellm_params or {}).get("text_completion"))
        return _fill(model_response, model, run(model, messages, optional_params, text=text))

    async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        # llama.cpp and generators block; run them in a worker thread so the event loop stays free.
        return await asyncio.to_thread(self.completion, *args, **kwargs)

    def streaming(self, *args: Any, **kwargs: Any) -> Iterator[GenericStreamingChunk]:
        # Streaming delivers the finished completion as one chunk: a context is never held
        # across yields, so an abandoned stream cannot block other callers.
        response = self.completion(*args, **kwargs)
        yield _single_chunk(response)

    async def astreaming(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenericStreamingChunk]:
        response = await self.acompletion(*args, **kwargs)
        yield _single_chunk(response)


def _single_chunk(response: ModelResponse) -> GenericStreamingChunk:
    choice = response.choices[0]
    usage = response.usage
    return GenericStreamingChunk(
        text=choice.message.content or "",
        tool_use=None,
        is_finished=True,
        finish_reason=choice.finish_reason,
        usage={
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        index=0,
    )
