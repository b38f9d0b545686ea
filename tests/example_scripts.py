"""Loading the example and benchmark scripts in tests: they are files in ``examples/`` and ``benchmarks/``, not
packages."""

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
BENCHMARKS = ROOT / "benchmarks"


@contextlib.contextmanager
def loaded_script(path: Path, name: str) -> Iterator[ModuleType]:
    """The script at ``path`` as the module ``name``, in ``sys.modules`` while in use.

    Dataclasses look their module up in ``sys.modules`` while it executes, so the module is
    registered before it runs and removed afterwards.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def loaded_example(name: str) -> contextlib.AbstractContextManager[ModuleType]:
    """``examples/<name>.py`` as the module ``example_<name>`` (see `loaded_script`)."""
    return loaded_script(EXAMPLES / f"{name}.py", f"example_{name}")
