"""Adding the ``local`` provider to litellm without importing litellm.

Importing litellm takes seconds, and `import dspy_opro` must stay cheap, so `register` only adds the
provider at once when litellm is already imported. Otherwise it installs a one-shot import hook
that adds the provider right after litellm's first import, whoever imports it (DSPy's lazy loader,
or user code calling `litellm.completion` directly).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import types
from typing import Any

from dspy_opro.local.names import PROVIDER

logger = logging.getLogger(__name__)

_lock = threading.RLock()


def _add_provider(litellm: types.ModuleType) -> None:
    from dspy_opro.local.provider import LocalLLM

    with _lock:
        for entry in litellm.custom_provider_map:
            if entry.get("provider") == PROVIDER:
                if not isinstance(entry.get("custom_handler"), LocalLLM):
                    logger.warning(
                        "litellm already has a custom provider named %r; dspy_opro's local models stay unregistered.",
                        PROVIDER,
                    )
                return
        litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": LocalLLM()})
    logger.debug("Registered the litellm provider %r", PROVIDER)


def _litellm_if_imported() -> types.ModuleType | None:
    module = sys.modules.get("litellm")
    # Present but not yet executed (an import in progress) does not count.
    if module is None or not hasattr(module, "custom_provider_map"):
        return None
    return module


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps litellm's loader: runs it, puts it back, then adds the provider."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        _remove_hook()
        try:
            self._loader.exec_module(module)
        finally:
            # From here on the module looks exactly as if it had been imported without the hook.
            if getattr(module.__spec__, "loader", None) is self:
                module.__spec__.loader = self._loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
        try:
            _add_provider(module)
        except Exception:  # a failure here must not break importing litellm
            logger.exception("Could not register the litellm provider %r", PROVIDER)

    def __getattr__(self, name: str) -> Any:
        # Resource readers and the like, asked for while litellm's __init__ runs.
        return getattr(self._loader, name)


class _LiteLLMImportHook(importlib.abc.MetaPathFinder):
    """Finds litellm through the other finders and wraps its loader; removed once litellm runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "litellm":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        # find_spec alone imports nothing (DSPy's lazy loader asks first, imports later), so
        # the hook stays until litellm has actually run.
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


_hook: _LiteLLMImportHook | None = None


def _remove_hook() -> None:
    global _hook
    with _lock:
        if _hook is not None and _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
        _hook = None


def register() -> None:
    """Make the ``local`` provider available to litellm (and so to ``dspy.LM``). Idempotent and cheap.

    Neither litellm nor llama_cpp is imported here: with litellm already imported the provider is
    added now, otherwise right after litellm's first import.
    """
    global _hook
    with _lock:
        litellm = _litellm_if_imported()
        if litellm is not None:
            _remove_hook()
            _add_provider(litellm)
            return
        if _hook is None:
            _hook = _LiteLLMImportHook()
            sys.meta_path.insert(0, _hook)


def is_registered() -> bool:
    """Whether litellm is imported and knows the ``local`` provider."""
    litellm = _litellm_if_imported()
    return litellm is not None and any(entry.get("provider") == PROVIDER for entry in litellm.custom_provider_map)
