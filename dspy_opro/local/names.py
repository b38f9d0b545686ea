"""The names of local models: ``local/<name>`` is a GGUF model or a Python generator, never both.

`dspy_opro.local.gguf` registers GGUF files here, `dspy_opro.local.generators` Python functions; the two
share one namespace, guarded by one lock, so a name always means one thing. `is_local_model` is the one
test of whether a model string or an LM runs on the local provider.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

PROVIDER = "local"
DEFAULT_MODEL = "smollm2"

_gguf: dict[str, Path | None] = {DEFAULT_MODEL: None}  # None: located on first use
_generators: dict[str, Any] = {}
_lock = threading.Lock()


def check_name(name: str) -> None:
    """Raise a `ValueError` unless ``name`` can be a short model name."""
    if not isinstance(name, str) or not name or "/" in name or name.lower().endswith(".gguf"):
        raise ValueError(f"A model name must be non-empty, contain no '/' and not end in '.gguf': {name!r}")


def _add(name: str, entry: Any, table: dict[str, Any], other: dict[str, Any], taken: str) -> None:
    check_name(name)
    with _lock:
        if name in other:
            raise ValueError(taken)
        table[name] = entry


def add_gguf(name: str, path: Path) -> None:
    """Name a GGUF file; refused when ``name`` is a generator's."""
    message = f"{name!r} already names a Python generator; unregister_generator({name!r}) first."
    _add(name, path, _gguf, _generators, message)


def add_generator(name: str, entry: Any) -> None:
    """Name a generator entry; refused when ``name`` is a GGUF model's."""
    _add(
        name, entry, _generators, _gguf, f"{name!r} already names a GGUF model; choose another name for the generator."
    )


def remove_generator(name: str) -> bool:
    """Forget the generator ``name``; whether there was one."""
    with _lock:
        return _generators.pop(name, None) is not None


def gguf_path(name: str) -> tuple[bool, Path | None]:
    """Whether ``name`` names a GGUF model, and its path (``None`` for the default model, located on use)."""
    with _lock:
        return name in _gguf, _gguf.get(name)


def generator(name: str) -> Any:
    """The generator entry named ``name``, or ``None``."""
    with _lock:
        return _generators.get(name)


def is_generator(name: str) -> bool:
    """Whether ``local/<name>`` is served by a registered Python generator."""
    with _lock:
        return name in _generators


def generator_names() -> list[str]:
    """The names given to `dspy_opro.local.register_generator`, sorted."""
    with _lock:
        return sorted(_generators)


def model_names() -> list[str]:
    """Every short name: ``smollm2``, names from `register_model` and from `register_generator`."""
    with _lock:
        return sorted({*_gguf, *_generators})


def _model_string(model: Any) -> str:
    return model if isinstance(model, str) else str(getattr(model, "model", ""))


def is_local_model(model: Any) -> bool:
    """Whether ``model`` (a model string or an LM) runs on the local provider: its model string starts ``local/``.

    Programs on such a model should run with `SmallModelAdapter` if the model is small.
    """
    return _model_string(model).startswith(f"{PROVIDER}/")


def model_part(model: Any) -> str:
    """The part of a local model string (or an LM's) after ``local/``; other strings are returned as they are."""
    name = _model_string(model)
    return name[len(PROVIDER) + 1 :] if is_local_model(name) else name


def serves_generator(model: Any) -> bool:
    """Whether ``model`` (a model string or an LM) is ``local/<name>`` for a registered Python generator."""
    return is_local_model(model) and is_generator(model_part(model))
