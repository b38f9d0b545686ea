"""Meta-prompt families, and what both OPRO loops share about meta-prompts.

A family is one way of asking the prompt model for a proposal. Its `Family` object holds everything
that depends on it: how the meta-prompt is written from the scored entries shown, how a proposal is
read back out of a reply, the strings that end a reply, and the kind of LM the meta-prompt is sent to
(`MODEL_TYPES`: ``"base"`` is continued as a plain text completion, the others are asked in a chat).
Instruction OPRO looks its families up by name in `dspy_opro.meta_prompt.FAMILIES`; numeric OPRO asks
its `dspy_opro.numeric.Problem` for the family of a name (`Problem.family`), which writes the problem's
own wording.

Both loops show the prompt model the best entries so far, worst first and best last (`choose_shown`),
with their values as integers (`display_value`), and pick the family for ``"auto"`` by one rule
(`meta_prompt_family`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

AUTO = "auto"

MODEL_TYPES = {"chat": "chat", "paper": "chat", "base": "text"}
"""The kind of LM (``dspy.LM``'s ``model_type``) each family's meta-prompt is written for."""


@dataclass(frozen=True)
class Scored:
    """An entry a meta-prompt shows: an instruction or a solution, and its score or objective value.

    Attributes:
        solution: The instruction text, or a numeric problem's solution (hashable).
        value: Its score (instructions: 0-100) or objective value.
        step: 0 for a starting entry, else the step that proposed it.
    """

    solution: Hashable
    value: float
    step: int = 0


@dataclass(frozen=True)
class Family:
    """One meta-prompt family.

    Attributes:
        name: The family's name, a key of `MODEL_TYPES`.
        write: ``write(shown, **context)``: the meta-prompt for the entries ``shown`` (`Scored`, already
            chosen and ordered by `choose_shown`); instruction families read ``exemplars`` and
            ``task_description`` from the context.
        read: ``read(reply)``: the proposal in a reply. Instruction families return the text or ``None``;
            numeric families return the solution or raise `dspy_opro.numeric.InvalidProposal`.
        stop: Strings that end a reply (a ``"base"`` meta-prompt ends with an open line to complete).
    """

    name: str
    write: Callable[..., str]
    read: Callable[[str], Any]
    stop: tuple[str, ...] = ()

    @property
    def model_type(self) -> str:
        """``"text"`` or ``"chat"``: the kind of LM the meta-prompt is sent to."""
        return MODEL_TYPES[self.name]


def check_family(name: Any, known: Sequence[str], *, argument: str = "meta_prompt", auto: bool = False) -> str:
    """``name`` if it is one of ``known`` (or ``"auto"`` when ``auto``); else a `ValueError` naming ``argument``."""
    allowed = (AUTO, *known) if auto else tuple(known)
    if name not in allowed:
        raise ValueError(f"{argument} must be one of {allowed}, got {name!r}")
    return name


def meta_prompt_family(model: Any) -> str:
    """The meta-prompt family that works for a prompt model: the one rule behind ``"auto"``.

    ``"base"`` (a scored list continued as a plain text completion) for the embedded local models and
    for any text-completion LM (``model_type="text"``): a small model proposes far more usable text
    when it continues a list than when it is asked in words. ``"chat"`` for every other model.
    Instruction OPRO (`dspy_opro.OPRO`) and numeric OPRO (`dspy_opro.numeric.optimize`) both use it.

    Args:
        model: A litellm model string or an LM.

    Returns:
        ``"base"`` or ``"chat"``.
    """
    from .local.names import is_local_model

    text = not isinstance(model, str) and getattr(model, "model_type", None) == "text"
    return "base" if text or is_local_model(model) else "chat"


def resolve_family(name: str, model: Any, known: Sequence[str], *, argument: str = "meta_prompt") -> str:
    """``name``, with ``"auto"`` replaced by `meta_prompt_family`'s choice for ``model``."""
    check_family(name, known, argument=argument, auto=True)
    return meta_prompt_family(model) if name == AUTO else name


def choose_shown(history: Sequence[Scored], *, max_shown: int, minimize: bool = False) -> list[Scored]:
    """The entries a meta-prompt shows: the best ``max_shown``, worst first, best last.

    Equal values keep their order of arrival, oldest first (the sort is stable).
    """
    ranked = sorted(history, key=lambda s: s.value, reverse=minimize)
    return ranked[-max_shown:] if max_shown > 0 else []


def display_value(value: float) -> int:
    """A score or an objective value as the integer a meta-prompt shows (halves round up), as in the paper."""
    return int(math.floor(value + 0.5))
