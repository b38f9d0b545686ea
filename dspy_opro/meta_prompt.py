"""The meta-prompts OPRO sends to the optimizer model, and how replies are read back.

Three families of wording, all listing past instructions in ascending order of score (best
last, next to the request) with integer scores from 0 to 100:

- ``"chat"`` for instruction-tuned models: the scored instructions, then a few task problems
  with ``<INS>`` where the instruction goes and their ground-truth answers, then a request for
  a better instruction between ``<INS>`` and ``</INS>``.
- ``"paper"``: the wording of the OPRO paper's figure 3 (texts with scores, exemplars as
  input/output pairs, the new text in square brackets).
- ``"base"`` for pretrained (completion) models: one line stating the goal, a few task
  examples as their fields, then one line per past instruction as
  ``Precision: <score> <TEXT>...</TEXT>``, ending with an open ``<TEXT>`` for the model to
  complete.

With ``feedback`` (`dspy_opro.OPRO`), an exemplar the current best program answers wrongly also
shows that answer and, when the metric returns one, the metric's feedback.

Every template is a module constant below, so the exact text sent can be read and diffed. Each
family is one `dspy_opro.families.Family` in `FAMILIES`: its writer, its reply reader and its stop
strings. `render_meta_prompt` builds a meta-prompt exactly as the optimizer sends it, for a user to
see; `extract_instruction` reads a reply as the optimizer does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .families import Family, Scored, check_family, choose_shown, display_value

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
CHAT_FAILURE = "The best instruction so far gave this wrong answer:\n{output}"
CHAT_FEEDBACK = "Feedback on that answer:\n{feedback}"
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
PAPER_FAILURE = "wrong output of the best text so far:\n{output}"
PAPER_FEEDBACK = "feedback:\n{feedback}"
PAPER_REQUEST = (
    "Write a new text that is different from the old ones and has a score as high as possible. "
    "Write the text in square brackets."
)

# --- "base": pretrained optimizer models, sent as a plain text completion ----------------
BASE_INTRO = "Write a short text, placed where <INS> stands, that makes the answers more precise for this task: {task}."
BASE_EXEMPLARS_INTRO = "Examples of the task:"
BASE_FAILURE = "(wrong answer given: {output})"
BASE_FEEDBACK = "(feedback: {feedback})"
BASE_ENTRY = "Precision: {score} <TEXT>{text}</TEXT>"
BASE_OPEN = "Precision: {score} <TEXT>"
BASE_STOP = "</TEXT>"


@dataclass(frozen=True)
class Exemplar:
    """A task example as the optimizer model sees it.

    Attributes:
        inputs: Input field name to value, as the instruction's predictor receives them.
        answer: Output field name to the ground-truth value.
        output: The current best program's wrong answer (output field name to value), when shown.
        feedback: The metric's feedback on that answer, when it gave one.
    """

    inputs: Mapping[str, str]
    answer: Mapping[str, str] = field(default_factory=dict)
    output: Mapping[str, str] | None = None
    feedback: str | None = None


def _fields(values: Mapping[str, str]) -> str:
    return "\n".join(f"{name}: {value}" for name, value in values.items())


def _problem(exemplar: Exemplar) -> str:
    return f"{PLACEHOLDER}\n{_fields(exemplar.inputs)}"


def _one_line(values: Mapping[str, str]) -> str:
    return "; ".join(" ".join(str(v).split()) for v in values.values())


def _failure(exemplar: Exemplar, failure: str, feedback: str, fields: Callable[[Mapping[str, str]], str]) -> list[str]:
    """The lines that show the best program's wrong answer and the metric's feedback (none if not shown)."""
    lines = []
    if exemplar.output is not None:
        lines.append(failure.format(output=fields(exemplar.output) or "(empty)"))
        if exemplar.feedback:
            lines.append(feedback.format(feedback=exemplar.feedback))
    return lines


# --- writing meta-prompts -----------------------------------------------------------------
def _write_base(
    shown: Sequence[Scored],
    *,
    exemplars: Sequence[Exemplar] = (),
    task_description: str = "answer the question",
    **_: Any,
) -> str:
    lines = [BASE_INTRO.format(task=task_description), ""]
    if exemplars:
        lines.append(BASE_EXEMPLARS_INTRO)
        for e in exemplars:
            lines += [_fields(e.inputs), _fields(e.answer), *_failure(e, BASE_FAILURE, BASE_FEEDBACK, _one_line)]
            lines.append("")
    lines += [BASE_ENTRY.format(score=display_value(s.value), text=s.solution) for s in shown]
    best = max((display_value(s.value) for s in shown), default=0)
    lines.append(BASE_OPEN.format(score=min(100, best + 10)))
    return "\n".join(lines)


def _writer(
    intro: str, entry: str, exemplars_intro: str, exemplar: str, failure: str, feedback: str, request: str
) -> Callable[..., str]:
    """The writer of a family that asks in words: intro, scored entries, exemplars, request."""

    def write(shown: Sequence[Scored], *, exemplars: Sequence[Exemplar] = (), **_: Any) -> str:
        parts = [intro, "\n\n".join(entry.format(text=s.solution, score=display_value(s.value)) for s in shown)]
        if exemplars:
            rendered = [
                "\n".join(
                    [
                        exemplar.format(problem=_problem(e), answer=_fields(e.answer)),
                        *_failure(e, failure, feedback, _fields),
                    ]
                )
                for e in exemplars
            ]
            parts += [exemplars_intro, "\n\n".join(rendered)]
        parts.append(request)
        return "\n\n".join(p for p in parts if p)

    return write


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


def _reader(*order: Callable[[str], str | None], fields: bool = True) -> Callable[[str | None], str | None]:
    """A reply reader trying the formats of ``order`` in turn, after DSPy's field layout when ``fields``."""

    def read(reply: str | None) -> str | None:
        if not reply or not reply.strip():
            return None
        field = _field_content(reply) if fields else None
        if field is not None:  # read the field as the whole reply; its first paragraph if no format matches
            reply = field
        for reader in order:
            found = reader(reply)
            if found:
                return found
        if field:
            return field.split("\n\n")[0].strip() or None
        return None

    return read


# --- the families ----------------------------------------------------------------------------
# Each family reads the format it asked for first, then the other formats, then a reply that is a single short
# line. The chat and paper families first read DSPy's own layouts ("[[ ## proposed_instruction ## ]]" fields, a
# JSON object), taking the instruction field's content, never a field marker.
FAMILIES: dict[str, Family] = {
    "chat": Family(
        "chat",
        write=_writer(
            CHAT_INTRO, CHAT_ENTRY, CHAT_EXEMPLARS_INTRO, CHAT_EXEMPLAR, CHAT_FAILURE, CHAT_FEEDBACK, CHAT_REQUEST
        ),
        read=_reader(_from_json, _from_tags, _from_brackets, _from_bare_reply),
    ),
    "paper": Family(
        "paper",
        write=_writer(
            PAPER_INTRO,
            PAPER_ENTRY,
            PAPER_EXEMPLARS_INTRO,
            PAPER_EXEMPLAR,
            PAPER_FAILURE,
            PAPER_FEEDBACK,
            PAPER_REQUEST,
        ),
        read=_reader(_from_json, _from_brackets, _from_tags, _from_bare_reply),
    ),
    "base": Family(
        "base", write=_write_base, read=_reader(_from_tags, _from_completion, fields=False), stop=(BASE_STOP,)
    ),
}
"""The instruction families by name (see the module docstring)."""


def get_family(name: str) -> Family:
    """The instruction family called ``name``; a `ValueError` for an unknown name."""
    return FAMILIES[check_family(name, tuple(FAMILIES))]


def render_meta_prompt(
    family: str,
    instructions: Sequence[tuple[str, float]],
    exemplars: Sequence[Exemplar] = (),
    *,
    max_shown: int = 20,
    task_description: str = "answer the question",
    **renamed: Any,
) -> str:
    """Build the meta-prompt text sent to the optimizer model.

    Args:
        family: ``"chat"``, ``"paper"`` or ``"base"`` (see the module docstring).
        instructions: ``(instruction, score)`` pairs with scores from 0 to 100, in any order.
            They are sorted ascending and the best ``max_shown`` are kept.
        exemplars: Task problems to show.
        max_shown: How many of the best instructions to show (``max_instructions``, its former name, is
            accepted with a `DeprecationWarning`).
        task_description: What the program does, used by the ``"base"`` wording.

    Returns:
        The meta-prompt, exactly as it is sent.
    """
    from .run import take_renamed

    max_shown = take_renamed(renamed, {"max_instructions": "max_shown"}, max_shown=max_shown)["max_shown"]
    if renamed:
        raise TypeError(f"render_meta_prompt() got an unexpected keyword argument {next(iter(renamed))!r}")
    shown = choose_shown([Scored(text, score) for text, score in instructions], max_shown=max_shown)
    return get_family(family).write(shown, exemplars=exemplars, task_description=task_description)


def extract_instruction(family: str, reply: str | None) -> str | None:
    """Read the proposed instruction out of an optimizer reply, as the family's reader does.

    Returns ``None`` when nothing usable is found (see `FAMILIES` for the formats each family reads).
    """
    return get_family(family).read(reply)


def __getattr__(name: str) -> Any:
    from .run import former_name

    return former_name(__name__, name, {"display_score": ("dspy_opro.families.display_value", lambda: display_value)})
