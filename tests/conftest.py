import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """Retry waits of milliseconds, not seconds: the tests keep OPRO's retry logic, not its patience."""
    from dspy_opro import calls

    monkeypatch.setattr(calls, "BACKOFF", calls.Backoff(first=0.005, max_delay=0.05, jitter=0.0))
