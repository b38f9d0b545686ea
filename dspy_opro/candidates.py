"""Turning extracted optimizer output into candidate instructions: normalise, de-duplicate, filter."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

DEFAULT_MAX_LENGTH = 500

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
_ANY_SPACE = re.compile(r"\s+")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`", "\u00ab": "\u00bb"}
_MARKUP = re.compile(r"</?(?:INS|TEXT)>", re.IGNORECASE)
# The reference drops every candidate holding "INS" (the placeholder's name, echoed back); as a word, so
# that "INSTRUCTIONS" or "insert" stay possible.
_PLACEHOLDER_WORD = re.compile(r"\bINS\b")
# DSPy's ChatAdapter field markers ("[[ ## answer ## ]]", or with single brackets) and bare field headers
# ("## output ##").
_ADAPTER_MARKER = re.compile(r"\[\s*##|##\s*\]")
_FIELD_HEADER = re.compile(r"^\s*#{1,6}\s*[\w ]+?\s*#{1,6}\s*$", re.MULTILINE)
_HEADING = re.compile(r"^\s*#{1,6}(?:\s|$)")
_LABEL = re.compile(r"^(?:new\s+)?(?:instruction|text)\s*:\s*", re.IGNORECASE)


def normalize_instruction(text: str) -> str:
    """Clean an extracted instruction.

    Strips surrounding whitespace and quotes, a leading ``Instruction:`` label and markdown
    bold markers, collapses runs of spaces within lines (line breaks are kept), and upper-cases
    the first character. Works on any Unicode text.
    """
    text = text.replace("**", "").strip()
    text = _LABEL.sub("", text).strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if line)
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text


def dedup_key(text: str) -> str:
    """The identity used to decide that two instructions are the same.

    Unicode compatibility normalisation (NFKC), case folding, whitespace collapsed, and
    trailing punctuation ignored, so "Solve it." and "solve  it" count as one instruction.
    """
    key = unicodedata.normalize("NFKC", text).casefold()
    key = _ANY_SPACE.sub(" ", key).strip()
    return key.rstrip(" .!;:")


def rejection_reason(
    text: str,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    extra_filter: Callable[[str], bool] | None = None,
) -> str | None:
    """Why a normalised candidate is unusable, or ``None`` if it may be scored.

    Reasons: ``"empty"``, ``"too_long"`` (over ``max_length`` characters), ``"placeholder"``
    (still contains ``<INS>``/``<TEXT>`` markup or the word ``INS``, i.e. the model echoed the
    template; the reference drops these too), ``"markup"`` (output formatting rather than an
    instruction: DSPy adapter field markers such as ``[[ ## proposed_instruction ## ]]``, a field
    header such as ``## output ##``, nothing but markdown headings, or a JSON object) and
    ``"filtered"`` (``extra_filter`` returned False).
    """
    if not text.strip():
        return "empty"
    if len(text) > max_length:
        return "too_long"
    if _MARKUP.search(text) or _PLACEHOLDER_WORD.search(text):
        return "placeholder"
    if _is_markup(text):
        return "markup"
    if extra_filter is not None and not extra_filter(text):
        return "filtered"
    return None


def _is_markup(text: str) -> bool:
    if _ADAPTER_MARKER.search(text) or _FIELD_HEADER.search(text):
        return True
    lines = [line for line in text.splitlines() if line.strip()]
    if all(_HEADING.match(line) for line in lines):
        return True
    stripped = text.strip()
    return stripped.startswith("{") and stripped.endswith("}")
