"""What OPRO needs to know about a black-box objective: the `Problem` interface.

A problem owns everything task-specific: its starting solutions, the objective, the words of
its meta-prompt and how a proposal is read back out of a reply, for each meta-prompt family it
writes (`Problem.families`; `Problem.family` gives one as a `dspy_opro.families.Family`, the object
instruction OPRO's families are too). The loop in `dspy_opro.numeric.loop` owns everything shared:
which scored solutions are shown and in what order, sampling, de-duplication, caps on attempts,
stopping, and the history.

Solutions are plain hashable values (tuples of numbers for the tasks here), so the loop can
de-duplicate them and write them to JSON.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Sequence
from typing import Any

from dspy_opro.families import Family, Scored, check_family, choose_shown, display_value
from dspy_opro.run import take_renamed

__all__ = ["InvalidProposal", "Problem", "Scored", "choose_shown", "display_value", "render_meta_prompt"]

FAMILY_NAMES = ("chat", "base")
"""The families the problems here write: ``"chat"`` asks an instruction-tuned model in words (the paper's
wording); ``"base"`` lists the scored solutions one per line and ends with an open line for a pretrained or
very small model to complete as plain text (sent as a text completion, cut at `Problem.stop`)."""


class InvalidProposal(ValueError):
    """A reply holds no usable solution.

    Args:
        reason: A short category used to count rejections (``"no pair found"``, ``"repeated node"``).
        detail: Optional specifics for the logs.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Problem(abc.ABC):
    """A black-box objective for `dspy_opro.numeric.optimize`.

    Subclasses set the class attributes and implement the abstract methods. The meta-prompt
    receives the scored solutions already chosen and ordered by the loop: at most
    ``max_shown``, worst first and best last (so descending values when minimizing, as in
    the paper).

    Attributes:
        name: Short name for logs and the history file.
        minimize: True when lower values are better.
        default_max_shown: How many scored solutions the meta-prompt shows unless told otherwise.
        families: The meta-prompt families the problem writes (names of `dspy_opro.families.MODEL_TYPES`).
    """

    name: str = "problem"
    minimize: bool = True
    default_max_shown: int = 20
    families: tuple[str, ...] = FAMILY_NAMES

    @abc.abstractmethod
    def initial_solutions(self) -> list[Hashable]:
        """The starting solutions, scored before the first step (deterministic for a given problem)."""

    @abc.abstractmethod
    def evaluate(self, solution: Hashable) -> float:
        """The objective value of a valid solution."""

    @abc.abstractmethod
    def parse(self, reply: str, family: str) -> Hashable:
        """Read a proposed solution out of a reply to the ``family`` meta-prompt.

        Raises:
            InvalidProposal: The reply holds no valid solution; its ``reason`` is counted.
        """

    @abc.abstractmethod
    def meta_prompt(self, shown: Sequence[Scored], family: str) -> str:
        """The ``family`` meta-prompt text for the scored solutions ``shown`` (worst first, best last)."""

    @property
    def optimum(self) -> float | None:
        """The best attainable value if known; the run can stop when a proposal reaches it."""
        return None

    def stop(self, family: str) -> list[str] | None:
        """Stop strings for the ``family`` meta-prompt (the ``base`` family closes its open line)."""
        return None

    def family(self, name: str, *, argument: str = "meta_prompt") -> Family:
        """The meta-prompt family ``name`` in this problem's wording: its writer, reader and stop strings."""
        check_family(name, self.families, argument=argument)
        return Family(
            name,
            write=lambda shown, **_: self.meta_prompt(shown, name),
            read=lambda reply: self.parse(reply, name),
            stop=tuple(self.stop(name) or ()),
        )

    def is_optimal(self, value: float) -> bool:
        """Whether ``value`` reaches the known optimum (within floating-point noise)."""
        best = self.optimum
        if best is None:
            return False
        tolerance = 1e-9 * max(1.0, abs(best))
        return value <= best + tolerance if self.minimize else value >= best - tolerance

    def better(self, a: float, b: float) -> bool:
        """Whether value ``a`` is strictly better than value ``b``."""
        return a < b if self.minimize else a > b

    def describe(self, solution: Hashable) -> str:
        """A solution as text for logs and reports."""
        return str(solution)

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able data that identifies this problem instance (checked before resuming a run)."""
        return {"name": self.name, "initial": [self.to_json(s) for s in self.initial_solutions()]}

    def to_json(self, solution: Hashable) -> Any:
        """A solution as JSON data (tuples become lists)."""
        return list(solution) if isinstance(solution, tuple) else solution

    def from_json(self, data: Any) -> Hashable:
        """The inverse of `to_json`."""
        return tuple(data) if isinstance(data, list) else data


def render_meta_prompt(
    problem: Problem,
    history: Sequence[Scored],
    meta_prompt: str | None = None,
    *,
    max_shown: int | None = None,
    **renamed: Any,
) -> str:
    """The meta-prompt the loop sends for ``history``: exactly the text the model receives.

    Args:
        problem: The problem.
        history: Every scored solution so far, in any order.
        meta_prompt: The family, ``"chat"`` or ``"base"`` (``style``, its former name, is accepted with a
            `DeprecationWarning`).
        max_shown: How many of the best to show; ``problem.default_max_shown`` by default.
    """
    given = take_renamed(renamed, {"style": "meta_prompt"}, meta_prompt=meta_prompt)
    if renamed:
        raise TypeError(f"render_meta_prompt() got an unexpected keyword argument {next(iter(renamed))!r}")
    if given["meta_prompt"] is None:
        raise TypeError("render_meta_prompt() needs the meta-prompt family: meta_prompt='chat' or 'base'")
    family = problem.family(given["meta_prompt"], argument=given.name("meta_prompt"))
    limit = problem.default_max_shown if max_shown is None else max_shown
    return family.write(choose_shown(history, max_shown=limit, minimize=problem.minimize))
