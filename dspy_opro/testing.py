"""Offline language models for tests, examples and benchmarks.

`scripted_lm` builds a real `dspy.LM` whose replies come from a Python function instead of a
provider. Everything else is DSPy's own machinery (adapters, cache, callbacks, history,
usage), so programs and optimizers behave exactly as they would against a remote model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events


@dataclass(frozen=True)
class ScriptedCall:
    """What a scripted reply function sees of one request."""

    system: str
    user: str
    temperature: float | None
    stop: tuple[str, ...]

    @property
    def text(self) -> str:
        """System and user text joined, for simple substring matching."""
        return f"{self.system}\n{self.user}" if self.system else self.user


def _words(text: str) -> int:
    return max(1, len(text.split()))


class ScriptedEngine:
    """A DSPy engine (``complete(Request) -> Response``) driven by a reply function.

    Args:
        reply: Called with a `ScriptedCall`; returns the reply text, or raises to simulate
            a provider failure.
        delay: Seconds to sleep per call, to imitate a latency-bound remote model.
    """

    def __init__(self, reply: Callable[[ScriptedCall], str], *, delay: float = 0.0):
        self.reply = reply
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def complete(self, request) -> Response:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        system = request.system if isinstance(request.system, str) or request.system is None else ""
        if request.system is not None and not isinstance(request.system, str):
            system = "".join(getattr(part, "text", "") for part in request.system)
        user = "\n\n".join(m.text or "" for m in request.messages if m.role == "user")
        call = ScriptedCall(
            system=system or "", user=user, temperature=request.config.temperature, stop=request.config.stop
        )
        text = self.reply(call)
        for stop in call.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=_words(call.text), output_tokens=_words(text)),
        )

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def scripted_lm(
    reply: Callable[[ScriptedCall], str], *, model: str = "scripted/lm", delay: float = 0.0, cache: bool = False
) -> dspy.LM:
    """A `dspy.LM` that answers with ``reply(call)``; see `ScriptedEngine`."""
    return dspy.LM(model, engine=ScriptedEngine(reply, delay=delay), cache=cache)
