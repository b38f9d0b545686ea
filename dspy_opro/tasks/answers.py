"""Answer checking in the style of the OPRO paper's evaluation.

Numeric answers: the text after the last answer marker ("answer is", "answer:", "####") is
searched for a number, otherwise the last number in the whole reply is taken; ``$``, ``,``
and ``%`` are ignored and the values are compared as numbers. Other answers: case and
punctuation are normalised; a multiple-choice answer counts by its option letter or its
option text; true/yes/valid and false/no/invalid are equivalence classes; free-form answers
count when the gold answer appears in the reply (the reference is that lenient too).
"""

from __future__ import annotations

import math
import re
import string

_MARKERS = re.compile(r"(?:answer\s+is|answer\s*:|####)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_OPTION_LETTER = re.compile(r"\(([A-R])\)")
_BARE_LETTER = re.compile(r"^\(?([A-R])[).:]?$")
_OPTION_LINE = re.compile(r"^\(([A-R])\)\s*(.+)$", re.MULTILINE)
_TRUE_WORDS = {"true", "yes", "valid"}
_FALSE_WORDS = {"false", "no", "invalid"}
_BOOL_WORD = re.compile(r"\b(true|false|yes|no|valid|invalid)\b", re.IGNORECASE)


def _after_marker(text: str) -> str | None:
    markers = list(_MARKERS.finditer(text))
    return text[markers[-1].end() :] if markers else None


def extract_number(text: str) -> float | None:
    """The numeric answer in ``text`` (see the module docstring), or ``None``."""
    if text is None:
        return None
    cleaned = str(text).replace(",", "").replace("$", "").replace("%", "")
    tail = _after_marker(cleaned)
    candidates = _NUMBER.findall(tail) if tail is not None else []
    if candidates:
        token = candidates[0]
    else:
        found = _NUMBER.findall(cleaned)
        if not found:
            return None
        token = found[-1]
    if "/" in token:
        numerator, denominator = token.split("/")
        return float(numerator) / float(denominator) if float(denominator) else None
    return float(token)


def numbers_equal(prediction: str, gold: str | float) -> bool:
    """Whether the number in ``prediction`` equals ``gold`` (to 1e-6 relative)."""
    value = extract_number(prediction)
    target = extract_number(str(gold)) if not isinstance(gold, (int, float)) else float(gold)
    return value is not None and target is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-9)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    table = str.maketrans("", "", string.punctuation)
    return " ".join(str(text).lower().translate(table).split())


def is_boolean_answer(text: str) -> bool:
    """Whether ``text`` is exactly one of the boolean answer words (true, no, valid, ...)."""
    return _BOOL_WORD.fullmatch(str(text).strip()) is not None


def _bool_class(text: str) -> bool | None:
    words = _BOOL_WORD.findall(text)
    if not words:
        return None
    last = words[-1].lower()
    return True if last in _TRUE_WORDS else False


def parse_options(question: str) -> dict[str, str]:
    """Option letter -> option text, from ``(A) ...`` lines of a multiple-choice question."""
    return {letter: body.strip() for letter, body in _OPTION_LINE.findall(question)}


def answers_match(prediction: str, gold: str, *, kind: str, question: str = "") -> bool:
    """Whether ``prediction`` answers with ``gold``.

    Args:
        prediction: The model's answer text.
        gold: The reference answer.
        kind: ``"numeric"``, ``"multiple_choice"``, ``"boolean"`` or ``"free_form"``.
        question: The question, whose ``(A) ...`` lines give the option texts.
    """
    prediction = "" if prediction is None else str(prediction)
    focus = _after_marker(prediction)
    focus = prediction if focus is None or not focus.strip() else focus
    if kind == "numeric":
        return numbers_equal(prediction, gold)
    if kind == "boolean":
        predicted, expected = _bool_class(focus), _bool_class(str(gold))
        return predicted is not None and predicted == expected
    if kind == "multiple_choice":
        gold_letter = _OPTION_LETTER.search(str(gold)) or _BARE_LETTER.match(str(gold).strip())
        if gold_letter is None:
            return normalize_answer(gold) in normalize_answer(focus)
        letter = gold_letter.group(1)
        letters = _OPTION_LETTER.findall(focus)
        if letters:
            return letters[-1] == letter
        bare = _BARE_LETTER.match(focus.strip())
        if bare:
            return bare.group(1) == letter
        option_text = parse_options(question).get(letter)
        return bool(option_text) and normalize_answer(option_text) in normalize_answer(focus)
    if kind == "free_form":
        expected = normalize_answer(gold)
        return bool(expected) and expected in normalize_answer(focus)
    raise ValueError(f"kind must be numeric, multiple_choice, boolean or free_form, got {kind!r}")
