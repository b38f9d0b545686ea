"""A loopback OpenAI-compatible server for tests: real HTTP on 127.0.0.1, scripted replies and faults.

Tests talk to it through litellm exactly as users talk to a hosted API
(``dspy.LM("openai/<name>", api_base=server.url, api_key="test-key")``). Every request is
answered by ``reply(request) -> str`` unless the fault plan says otherwise, and every request
is logged, so a test can compare what OPRO reports with what the server saw.

Faults (`Fault`) are real protocol events: an HTTP status with an OpenAI-style error body and
optional ``Retry-After``, a connection reset, a stall longer than the client's timeout, a body
that is not JSON, or a reply with empty content. ``reply`` is called only for replies that are
sent (not for a malformed body, nor for a stalled client that gave up), so a reply function
that counts its calls counts what clients received. A stalled request whose client gave up is
logged with its prompt tokens (what a provider bills) and ``delivered=False``. A plan is ``plan(request) -> Fault | None``;
`FaultPlan` covers the usual ones (the first n requests, every k-th, a share at random, or an
outage switched on and off by the test).
"""

from __future__ import annotations

import json
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("status", "reset", "stall", "malformed", "empty")


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Attributes:
        kind: ``"status"`` (answer with ``status``), ``"reset"`` (close the connection without a
            reply), ``"stall"`` (wait ``seconds`` before answering normally; past the client's
            timeout the client gives up), ``"malformed"`` (a 200 whose body is not JSON) or
            ``"empty"`` (a 200 whose message content is empty).
        status: HTTP status for ``"status"`` faults (429, 500, 503, 401, 404, ...).
        retry_after: ``Retry-After`` header value in seconds, if any.
        seconds: Stall length.
        message: Error message in the body.
    """

    kind: str
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0
    message: str = "injected fault"

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {FAULT_KINDS}")


@dataclass
class Request:
    """One request as the server received it, and what it did with it."""

    index: int
    path: str
    body: dict[str, Any]
    api_key: str | None
    fault: Fault | None = None
    status: int | None = None  # HTTP status sent; None for a reset
    prompt_tokens: int = 0
    completion_tokens: int = 0
    received: float = 0.0  # time.monotonic() on arrival
    delivered: bool = False  # a response was sent (none after a reset, or to a stalled client that gave up)

    @property
    def text(self) -> str:
        """The prompt: chat messages' contents joined, or the completion prompt."""
        if "messages" in self.body:
            parts = []
            for message in self.body["messages"]:
                content = message.get("content")
                if isinstance(content, list):
                    content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
                parts.append(str(content or ""))
            return "\n".join(parts)
        prompt = self.body.get("prompt", "")
        return prompt if isinstance(prompt, str) else "\n".join(map(str, prompt))

    @property
    def succeeded(self) -> bool:
        """A readable reply (an empty one included) reached the client."""
        return self.delivered and self.status == 200 and (self.fault is None or self.fault.kind != "malformed")


class FaultPlan:
    """Common fault plans; call the instance with a `Request`.

    Args:
        fault: The fault to inject.
        first: Inject it on the first ``first`` requests.
        every: Inject it on every ``every``-th request (1-based: requests every, 2*every, ...).
        share: Inject it on this share of requests, drawn with ``seed``.
        match: Only requests whose prompt contains this text are affected.
        seed: Seed of the ``share`` draws.
    """

    def __init__(
        self,
        fault: Fault,
        *,
        first: int = 0,
        every: int = 0,
        share: float = 0.0,
        match: str | None = None,
        seed: int = 0,
    ):
        self.fault = fault
        self.first, self.every, self.share, self.match = first, every, share, match
        self.down = False  # an outage: every matching request fails while True
        self._seen = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Fault | None:
        if self.match is not None and self.match not in request.text:
            return None
        with self._lock:
            self._seen += 1
            n = self._seen
            draw = self._random.random()
        if self.down or n <= self.first or (self.every and n % self.every == 0) or draw < self.share:
            return self.fault
        return None


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


class OpenAIServer:
    """An OpenAI-compatible HTTP server on 127.0.0.1 (``/v1/chat/completions``, ``/v1/completions``).

    Use as a context manager, or call `start` and `stop`. ``url`` is the ``api_base`` to give
    litellm. ``requests`` is the log, in arrival order.

    Args:
        reply: ``reply(request) -> str``, the text of a successful answer.
        plan: ``plan(request) -> Fault | None``; None injects nothing.
        api_key: When set, requests with another bearer token get a 401.
        models: When set, requests for other model names get a 404.
    """

    def __init__(
        self,
        reply: Callable[[Request], str] = lambda request: "ok",
        *,
        plan: Callable[[Request], Fault | None] | None = None,
        api_key: str | None = None,
        models: tuple[str, ...] | None = None,
    ):
        self.reply = reply
        self.plan = plan
        self.api_key = api_key
        self.models = models
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIServer:
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._stopping.clear()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # stalled handlers wake up and return
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def lm_kwargs(self, model: str = "test-model", **extra: Any) -> dict[str, Any]:
        """Keyword arguments for a `dspy.LM` that talks to this server through litellm."""
        return {
            "model": f"openai/{model}",
            "api_base": self.url,
            "api_key": self.api_key or "test-key",
            "engine": "litellm",
            **extra,
        }

    # ------------------------------------------------------------------- queries
    def count(self, *, succeeded: bool | None = None, path: str | None = None) -> int:
        """Requests logged, optionally only those that succeeded (or failed), or on one path."""
        with self._lock:
            rows = list(self.requests)
        return sum(
            1
            for r in rows
            if (succeeded is None or r.succeeded == succeeded) and (path is None or r.path.endswith(path))
        )

    # ------------------------------------------------------------------ handling
    def _log(self, path: str, body: dict[str, Any], api_key: str | None) -> Request:
        with self._lock:
            request = Request(
                index=len(self.requests), path=path, body=body, api_key=api_key, received=time.monotonic()
            )
            self.requests.append(request)
        return request

    def _decide(self, request: Request) -> Fault | None:
        if self.api_key is not None and request.api_key != self.api_key:
            return Fault("status", status=401, message="Incorrect API key provided.")
        if self.models is not None and request.body.get("model") not in self.models:
            return Fault("status", status=404, message=f"The model `{request.body.get('model')}` does not exist.")
        return self.plan(request) if self.plan is not None else None

    def _stall(self, seconds: float) -> None:
        self._stopping.wait(seconds)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


class _Handler(BaseHTTPRequestHandler):
    server_state: OpenAIServer
    protocol_version = "HTTP/1.1"
    # Headers and body leave in separate writes; with Nagle's algorithm on, the body then waits for the
    # client's delayed ACK (about 40 ms per request on Linux).
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # keep test output clean
        pass

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _deliver(self, request: Request, status: int, payload: dict[str, Any], headers=None) -> None:
        """Send a reply and log it as delivered. It is logged first: a client may read the reply and query the log
        before this thread runs again."""
        request.status, request.delivered = status, True
        try:
            self._send_json(status, payload, headers)
        except OSError:
            request.delivered = False
            raise

    def _client_gone(self) -> bool:
        """Whether the client closed its end (a read would return end-of-file at once)."""
        ready, _, _ = select.select([self.connection], [], [], 0)
        if not ready:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self):
        self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self):
        state = self.server_state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        auth = self.headers.get("Authorization", "")
        api_key = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        request = state._log(self.path, body, api_key)
        chat = self.path.rstrip("/").endswith("/chat/completions")
        if not chat and not self.path.rstrip("/").endswith("/completions"):
            request.status = 404
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return

        fault = state._decide(request)
        request.fault = fault
        if fault is not None and fault.kind == "status":
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            error = {"message": fault.message, "type": _ERROR_TYPES.get(fault.status, "server_error"), "code": None}
            self._deliver(request, fault.status, {"error": error}, headers)
            return
        if fault is not None and fault.kind == "reset":
            request.status = None
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault is not None and fault.kind == "stall":
            state._stall(fault.seconds)
            if state._stopping.is_set():
                return
            if self._client_gone():  # it timed out: the prompt is billed, no reply is made or sent
                request.status = 200
                request.prompt_tokens = _tokens(request.text)
                return

        if fault is not None and fault.kind == "malformed":  # no reply is made: the body is cut short
            data = b'{"id": "broken", "choices": [ {"message": '
            request.status, request.delivered = 200, True  # logged before the client can read it
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        text = "" if fault is not None and fault.kind == "empty" else state.reply(request)
        n = int(body.get("n") or 1)
        request.prompt_tokens = _tokens(request.text)
        request.completion_tokens = _tokens(text) * n
        usage = {
            "prompt_tokens": request.prompt_tokens,
            "completion_tokens": request.completion_tokens,
            "total_tokens": request.prompt_tokens + request.completion_tokens,
        }
        if chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                for i in range(n)
            ]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None} for i in range(n)]
            obj = "text_completion"
        payload = {
            "id": f"req-{request.index}",
            "object": obj,
            "created": int(time.time()),
            "model": body.get("model", "unknown"),
            "choices": choices,
            "usage": usage,
        }
        self._deliver(request, 200, payload)
