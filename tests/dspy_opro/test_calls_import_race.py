"""The start-up race of DSPy 3.4's lazy litellm import cannot reach OPRO's worker threads.

In a fresh process the first parallel calls can mix DSPy cache hits and misses. A hit unpickles
its cached litellm response, which imports litellm in that thread; a miss in another thread asks
DSPy's lazy loader for litellm meanwhile and gets the half-initialised module. The child process
below sets that up on purpose (the misses wait half a second, so the hits start the import) and
samples through `dspy_opro.sampling.ask`, which runs on the same pool as all of OPRO's calls
(`dspy_opro.calls.run_jobs`).
"""

import json
import os
import subprocess
import sys

import dspy
import pytest
from openai_server import OpenAIServer

from dspy_opro.sampling import sample_one

KEY = ("race",)
HITS = (0, 2, 4, 6)

CHILD = r"""
import json, sys, time
import dspy
from dspy.utils.callback import BaseCallback
from dspy_opro import calls
from dspy_opro.sampling import ask, rollout_id

if {without_fix}:
    calls.finish_lazy_imports = lambda lms: None
assert "litellm" not in sys.modules
dspy.cache = dspy.clients.cache.Cache(True, True, {cache_dir!r}, 10**8, 10**5)
misses = {{rollout_id(*{key!r}, j) for j in range(8) if j not in {hits!r}}}


class LateMisses(BaseCallback):
    def on_lm_start(self, call_id, instance, inputs):
        if instance.kwargs.get("rollout_id") in misses:
            time.sleep(0.5)


lm = dspy.LM("openai/test-model", api_base={url!r}, api_key="k", engine="litellm", num_retries=0, cache=True)
with dspy.context(callbacks=[LateMisses()]):
    outcomes = ask(lm, "hello", range(8), temperature=1.0, key={key!r}, retries=0, model=None, step=1, total=8,
                   num_threads=8)
replies = [o.value if o.ok else o.error for o in outcomes]
print(json.dumps([r if isinstance(r, str) else f"{{type(r).__name__}}: {{r}}" for r in replies]))
"""


def _run_child(tmp_path, monkeypatch, *, without_fix: bool) -> tuple[list[str], int]:
    """The child's replies, and how many requests reached the server from the child."""
    cache_dir = str(tmp_path / "cache")
    with OpenAIServer(lambda request: "hi") as server:
        lm = dspy.LM(**server.lm_kwargs(), num_retries=0, cache=True)
        monkeypatch.setattr(dspy, "cache", dspy.clients.cache.Cache(True, True, cache_dir, 10**8, 10**5))
        for j in HITS:  # this process caches the replies of the even samples
            sample_one(lm, "hello", j, temperature=1.0, key=KEY)
        code = CHILD.format(without_fix=without_fix, cache_dir=cache_dir, key=KEY, hits=HITS, url=server.url)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert child.returncode == 0, child.stderr[-2000:]
        sent = server.count() - len(HITS)
    return json.loads(child.stdout.strip().splitlines()[-1]), sent


def test_the_import_is_finished_in_the_calling_thread_before_any_worker_starts(monkeypatch):
    import importlib
    import threading

    from dspy_opro import calls
    from dspy_opro.testing import scripted_lm

    imported, real = [], importlib.import_module

    def spy(name, *args, **kwargs):
        imported.append((name, threading.current_thread() is threading.main_thread(), threading.active_count()))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", spy)
    litellm_lm = dspy.LM("openai/test-model", engine="litellm")
    calls.run_jobs([lambda: 1] * 3, num_threads=3, retries=0, on_outcome=lambda i, o: False, lms=[litellm_lm])
    before = threading.active_count()
    assert imported[0][:2] == ("litellm", True) and all(main for _, main, _ in imported)
    assert imported[0][2] <= before  # no pool thread existed yet
    imported.clear()
    scripted = scripted_lm(lambda call: "x")  # a custom engine never touches litellm: nothing to import
    calls.run_jobs([lambda: 1], num_threads=1, retries=0, on_outcome=lambda i, o: False, lms=[scripted])
    assert imported == []


@pytest.mark.slow
def test_the_first_parallel_calls_of_a_process_all_succeed_when_hits_and_misses_mix(tmp_path, monkeypatch):
    replies, sent = _run_child(tmp_path, monkeypatch, without_fix=False)
    assert replies == ["hi"] * 8 and sent == 8 - len(HITS)  # the hits came from the cache


@pytest.mark.slow
def test_without_finishing_the_import_first_the_race_loses_calls(tmp_path, monkeypatch):
    replies, _ = _run_child(tmp_path, monkeypatch, without_fix=True)
    lost = [r for r in replies if r != "hi"]
    assert lost and all("partially initialized module 'litellm'" in r or "KeyError" in r for r in lost), replies
