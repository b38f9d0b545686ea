"""What a failed call means: one policy for every place that calls a model.

A provider failure is one of three kinds, and each kind gets one treatment everywhere
(the set-up check before a run, the scoring of candidates, the sampling of proposals):

- ``FATAL``: the call can never succeed as configured — no or wrong API key, no permission,
  unknown model, a request the provider rejects (bad parameter, context window, content
  policy), no credit or quota left. Retrying wastes time and money: stop at once and say how
  to fix it.
- ``TRANSIENT``: the call may succeed if repeated — rate limits, server errors, timeouts,
  dropped connections, unreadable responses. Retry with backoff; if it keeps failing, the
  provider is down.
- ``OUTPUT``: the model answered but its reply could not be read as the program's output
  (DSPy's adapter could not parse it). That is the model's answer to this instruction, so it
  scores as a wrong answer, never as a fault.

Anything else raised while running a program (a bug in the user's module or metric) is
``PROGRAM``: a failure, counted against ``max_errors``.

DSPy 3.4 wraps engine failures in its own `dspy.utils.exceptions.LMError` classes; raw
litellm / OpenAI-SDK exceptions (from code that calls litellm directly) are classified by
their HTTP status. The first match wins.
"""

from __future__ import annotations

import re

FATAL = "fatal"
TRANSIENT = "transient"
OUTPUT = "output"
PROGRAM = "program"

_FATAL_STATUS = {400, 401, 402, 403, 404, 413, 422}
_TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}
# Provider messages that mean "fatal" although the error type says otherwise: litellm reports a
# missing key as a server error, and an exhausted quota as a rate limit.
_FATAL_TEXT = re.compile(
    r"missing credentials|api[_ ]key (?:is )?(?:missing|not (?:set|found|provided))|no api key|"
    r"insufficient_quota|exceeded your current quota|quota exceeded|billing|budget exceeded|credit balance",
    re.IGNORECASE,
)


def _dspy_kind(exc: BaseException) -> str | None:
    from dspy.utils import exceptions as e

    if not isinstance(exc, e.LMError):
        return None
    if isinstance(exc, (e.LMRateLimitError, e.LMServerError, e.LMTransportError)) and _FATAL_TEXT.search(str(exc)):
        return FATAL
    fatal = (
        e.LMAuthError,
        e.LMBillingError,
        e.LMInvalidRequestError,  # includes ContextWindowExceededError and LMUnsupportedModelError
        e.LMConfigurationError,  # includes LMNotConfiguredError (no API key)
        e.LMUnsupportedFeatureError,
        e.LMCollectionLimitError,
    )
    if isinstance(exc, fatal):
        return FATAL
    return TRANSIENT  # rate limits, server errors, timeouts, transport, lock timeouts, unknown LM errors


def _status(exc: BaseException) -> int | None:
    for name in ("status_code", "status"):
        value = getattr(exc, name, None)
        if isinstance(value, int):
            return value
    return None


def classify(exc: BaseException) -> str:
    """The kind of a failure: `FATAL`, `TRANSIENT`, `OUTPUT` or `PROGRAM` (see the module docstring)."""
    kind = _dspy_kind(exc)
    if kind is not None:
        return kind
    from dspy.utils.exceptions import AdapterParseError

    if isinstance(exc, AdapterParseError):
        return OUTPUT
    status = _status(exc)
    module = type(exc).__module__ or ""
    from_provider = module.startswith(("litellm", "openai", "httpx", "httpcore"))
    if status is not None and from_provider:
        if _FATAL_TEXT.search(str(exc)):
            return FATAL
        if status in _FATAL_STATUS:
            return FATAL
        if status in _TRANSIENT_STATUS or status >= 500:
            return TRANSIENT
    if from_provider:
        if _FATAL_TEXT.search(str(exc)):
            return FATAL
        return TRANSIENT  # connection errors, timeouts, unreadable responses
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return TRANSIENT
    return PROGRAM


def retry_after(exc: BaseException) -> float | None:
    """Seconds the provider asked to wait before retrying (``Retry-After``), if it said."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        raw = headers.get("retry-after") or headers.get("Retry-After")
        try:
            return max(0.0, float(raw)) if raw is not None else None
        except (TypeError, ValueError):
            return None
    return None


def describe(exc: BaseException) -> str:
    """A one-line description of a failure: the exception type and the provider's message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__
