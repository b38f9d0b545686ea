"""Loading the example scripts in tests: they are files in ``examples/``, not a package."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"  # the shared helpers, for child processes to import
EXAMPLES = ROOT / "examples"


@contextlib.contextmanager
def loaded_example(name: str) -> Iterator[ModuleType]:
    """``examples/<name>.py`` as the module ``example_<name>``, in ``sys.modules`` while in use.

    Dataclasses look their module up in ``sys.modules`` while it executes, so the module is
    registered before it runs and removed afterwards.
    """
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
