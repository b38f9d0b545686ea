"""The meta-prompts OPRO sends to the optimizer model, and how replies are read back.

Three families of wording, all listing past instructions in ascending order of score (best
last, next to the request) with integer scores from 0 to 100:

- ``"chat"`` for instruction-tuned models: the scored instructions, then a few task problems
  with ``<INS>`` where the instruction goes and their ground-truth answers, then a request for
  a better instruction between ``<INS>`` and ``</INS>``.
- ``"paper"``: the wording of the OPRO paper's figure 3 (texts with scores, exemplars as
  input/output pairs, the new text in square brackets).
- ``"base"`` for pretrained (completion) models: one line stating the goal, then one line
  per past instruction as ``Precision: <score> <TEXT>...</TEXT>``, ending with an open
  ``<TEXT>`` for the model to complete. No exemplars.

Every template is a module constant below, so the exact text sent can be read and diffed.
`render_meta_prompt` is the single function that builds a meta-prompt; the optimizer calls
it and so can a user, to see exactly what is sent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

FAMILIES = ("chat", "paper", "base")
PLACEHOLDER = "<INS>"

# --- "chat": instruction-tuned optimizer models -------------------------------------------
CHAT_INTRO = (
    "Your job is to write the instruction that belongs where <INS> stands. Below are instructions "
    "written so far, each with its score. Scores run from 0 to 100 and higher is better; the list "
    "goes from the lowest score to the highest."
)
CHAT_ENTRY = "Instruction: {text}\nScore: {score}"
CHAT_EXEMPLARS_INTRO = "Below are some problems. <INS> marks where the instruction is placed."
CHAT_EXEMPLAR = "Problem:\n{problem}\nGround truth answer:\n{answer}"
CHAT_REQUEST = (
    "Write a new instruction that differs from every instruction above and that will score higher "
    "than all of them. Keep it concise, effective and applicable to every problem of this kind. "
    "Reply with the instruction only, starting with <INS> and ending with </INS>."
)

# --- "paper": the OPRO paper's figure 3 wording -------------------------------------------
PAPER_INTRO = (
    "I have some texts, each with a score. They are listed in ascending order of score, and a "
    "higher score means better quality."
)
PAPER_ENTRY = "text:\n{text}\nscore:\n{score}"
PAPER_EXEMPLARS_INTRO = (
    "The examples below show how a text is used: replace <INS> in the input with the text, then "
    "read the input and write an output. An output that differs from the given output counts as "
    "wrong; one that matches counts as right."
)
PAPER_EXEMPLAR = "input:\n{problem}\noutput:\n{answer}"
PAPER_REQUEST = (
    "Write a new text that is different from the old ones and has a score as high as possible. "
    "Write the text in square brackets."
)

# --- "base": pretrained optimizer models, sent as a plain text completion ----------------
BASE_INTRO = "Write a short text, placed where <INS> stands, that makes the answers more precise for this task: {task}."
BASE_ENTRY = "Precision: {score} <TEXT>{text}</TEXT>"
BASE_OPEN = "Precision: {score} <TEXT>"
BASE_STOP = "</TEXT>"


@dataclass(frozen=True)
class Exemplar:
    """A task example as the optimizer model sees it.

    Attributes:
        inputs: Input field name to value, as the instruction's predictor receives them.
        answer: Output field name to the ground-truth value.
    """

    inputs: Mapping[str, str]
    answer: Mapping[str, str] = field(default_factory=dict)


def display_score(score: float) -> int:
    """A 0-100 score as the integer shown in the meta-prompt (halves round up)."""
    return int(math.floor(score + 0.5))


def _fields(values: Mapping[str, str]) -> str:
    return "\n".join(f"{name}: {value}" for name, value in values.items())


def _problem(exemplar: Exemplar) -> str:
    return f"{PLACEHOLDER}\n{_fields(exemplar.inputs)}"


def _ascending(instructions: Sequence[tuple[str, float]], limit: int) -> list[tuple[str, float]]:
    # sorted() is stable: equal scores keep their order of arrival, oldest first.
    ranked = sorted(instructions, key=lambda item: item[1])
    return ranked[-limit:] if limit > 0 else []


def render_meta_prompt(
    family: str,
    instructions: Sequence[tuple[str, float]],
    exemplars: Sequence[Exemplar] = (),
    *,
    max_instructions: int = 20,
    task_description: str = "answer the question",
) -> str:
    """Build the meta-prompt text sent to the optimizer model.

    Args:
        family: ``"chat"``, ``"paper"`` or ``"base"`` (see the module docstring).
        instructions: ``(instruction, score)`` pairs with scores from 0 to 100, in any order.
            They are sorted ascending and the best ``max_instructions`` are kept.
        exemplars: Task problems to show (ignored by ``"base"``).
        max_instructions: How many of the best instructions to show.
        task_description: What the program does, used by the ``"base"`` wording.

    Returns:
        The meta-prompt, exactly as it is sent.
    """
    if family not in FAMILIES:
        raise ValueError(f"meta_prompt must be one of {FAMILIES}, got {family!r}")
    shown = _ascending(instructions, max_instructions)

    if family == "base":
        lines = [BASE_INTRO.format(task=task_description), ""]
        lines += [BASE_ENTRY.format(score=display_score(s), text=t) for t, s in shown]
        best = max((display_score(s) for _, s in shown), default=0)
        lines.append(BASE_OPEN.format(score=min(100, best + 10)))
        return "\n".join(lines)

    if family == "chat":
        intro, entry, ex_intro, ex_format, request = (
            CHAT_INTRO,
            CHAT_ENTRY,
            CHAT_EXEMPLARS_INTRO,
            CHAT_EXEMPLAR,
            CHAT_REQUEST,
        )
    else:
        intro, entry, ex_intro, ex_format, request = (
            PAPER_INTRO,
            PAPER_ENTRY,
            PAPER_EXEMPLARS_INTRO,
            PAPER_EXEMPLAR,
            PAPER_REQUEST,
        )
    parts = [intro, "\n\n".join(entry.format(text=t, score=display_score(s)) for t, s in shown)]
    if exemplars:
        rendered = [ex_format.format(problem=_problem(e), answer=_fields(e.answer)) for e in exemplars]
        parts += [ex_intro, "\n\n".join(rendered)]
    parts.append(request)
    return "\n\n".join(p for p in parts if p)


# --- reading replies -----------------------------------------------------------------------
_TAGGED = re.compile(r"<INS>(.*?)</INS>", re.IGNORECASE | re.DOTALL)
_OPEN_TAG = re.compile(r"<INS>", re.IGNORECASE)
_BRACKETED = re.compile(r"\[([^\[\]]+)\]", re.DOTALL)
_TEXT_OPEN = re.compile(r"<TEXT>", re.IGNORECASE)
_TEXT_CLOSE = re.compile(r"</TEXT>", re.IGNORECASE)
_LETTER = re.compile(r"[^\W\d_]")
_MAX_BARE_REPLY = 300  # a tagless reply is taken whole only if it is one short line
# DSPy's ChatAdapter writes each output field after a "[[ ## name ## ]]" marker; chat models trained on
# DSPy traffic answer in that layout unasked.
_FIELD_MARKER = re.compile(r"\[\[\s*##\s*([\w ]+?)\s*##\s*\]\]")
_NOT_INSTRUCTION_FIELDS = {"completed", "reasoning", "rationale"}
_DSPY_MARKER_INSIDE = re.compile(r"^\s*##.*##\s*$", re.DOTALL)


def _field_content(reply: str) -> str | None:
    """The content of the instruction field of a reply in DSPy's field layout (``None`` if it has none).

    The field named like an instruction wins, else the first field that is not DSPy's ``completed``
    marker or a reasoning field; an empty string when the reply has fields but none holds text.
    """
    parts = _FIELD_MARKER.split(reply)
    if len(parts) < 3:
        return None
    fields = [(name.strip().lower(), content.strip()) for name, content in zip(parts[1::2], parts[2::2], strict=True)]
    named = [content for name, content in fields if "instruction" in name and content]
    others = [content for name, content in fields if name not in _NOT_INSTRUCTION_FIELDS and content]
    return (named or others or [""])[0]


def _from_json(reply: str) -> str | None:
    """The instruction of a reply that is a JSON object (DSPy's JSONAdapter layout)."""
    text = reply.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    texts = {str(k).lower(): v for k, v in data.items() if isinstance(v, str) and v.strip()}
    named = [v for k, v in texts.items() if "instruction" in k]
    if named or len(texts) == 1:
        return (named or list(texts.values()))[0].strip()
    return None


def _from_tags(reply: str) -> str | None:
    found = [m.strip() for m in _TAGGED.findall(reply) if m.strip()]
    if found:
        return found[-1]
    opened = list(_OPEN_TAG.finditer(reply))
    if opened:
        rest = reply[opened[-1].end() :].strip()
        rest = rest.split("\n\n")[0].strip()
        return rest or None
    return None


def _from_brackets(reply: str) -> str | None:
    found = [m.strip() for m in _BRACKETED.findall(reply) if _LETTER.search(m) and not _DSPY_MARKER_INSIDE.match(m)]
    return found[-1] if found else None


def _from_bare_reply(reply: str) -> str | None:
    text = reply.strip()
    if text and "\n" not in text and len(text) <= _MAX_BARE_REPLY and _LETTER.search(text):
        return text
    return None


def _from_completion(reply: str) -> str | None:
    # The reply continues an open <TEXT>: keep what comes before the first </TEXT> (the stop
    # string, in case the model ignored it), after any <TEXT> the model wrote itself.
    head = _TEXT_CLOSE.split(reply, maxsplit=1)[0]
    head = _TEXT_OPEN.split(head)[-1]
    lines = [line.strip() for line in head.strip().split("\n") if line.strip()]
    return lines[0] if lines else None


def extract_instruction(family: str, reply: str | None) -> str | None:
    """Read the proposed instruction out of an optimizer reply.

    Each family first looks for the format it asked for, then falls back to the other
    formats, then to a reply that is a single short line. The chat and paper families first
    read replies in DSPy's own layouts (``[[ ## proposed_instruction ## ]]`` fields, a JSON
    object), taking the instruction field's content, never a field marker. Returns ``None``
    when nothing usable is found.
    """
    if not reply or not reply.strip():
        return None
    if family == "chat":
        order = (_from_json, _from_tags, _from_brackets, _from_bare_reply)
    elif family == "paper":
        order = (_from_json, _from_brackets, _from_tags, _from_bare_reply)
    elif family == "base":
        order = (_from_tags, _from_completion)
    else:
        raise ValueError(f"meta_prompt must be one of {FAMILIES}, got {family!r}")
    field = _field_content(reply) if family != "base" else None
    if field is not None:  # read the field as the whole reply; its first paragraph if no format matches
        reply = field
    for reader in order:
        found = reader(reply)
        if found:
            return found
    if field:
        return field.split("\n\n")[0].strip() or None
    return None
