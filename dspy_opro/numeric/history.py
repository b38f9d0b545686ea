"""The state of a numeric OPRO run: every proposal with its fate, the steps, the step in flight and the counts.

Everything here is plain data that round-trips through the JSON history in ``log_dir``
(`dspy_opro.run.Checkpoint`), with solutions written as JSON by the `Problem`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dspy_opro.counting import CallStats
from dspy_opro.run import CountsRecord

from .problem import Problem

FORMAT_VERSION = 1
CHECKPOINT_NAME = "opro_numeric_history.json"
LEDGER_NAME = "opro_numeric_calls.jsonl"
MAX_REPLY_CHARS = 2000  # replies are kept in the history for inspection, cut to this length

STOP_REASONS = ("optimum", "num_steps", "max_calls")


@dataclass
class Proposal:
    """One solution the run considered: a starting solution, one reply of the prompt model, or a failed request.

    Attributes:
        step: 0 for starting solutions, else the step that sampled the reply.
        sample: Position of the entry within its step (or of the starting solution).
        status: ``"initial"``, ``"valid"`` (new and evaluated), ``"duplicate"`` (already
            evaluated), ``"invalid"`` (no valid solution in the reply) or ``"error"`` (a request that
            failed; never a result: the sample was retried or asked for again).
        solution: The solution read from the reply, if any.
        value: Its objective value, for ``"initial"`` and ``"valid"``.
        reason: Why an invalid reply was rejected, or the error of a failed request.
        reply: The reply text (cut to `MAX_REPLY_CHARS`); ``None`` for starting solutions.
    """

    step: int
    sample: int
    status: str
    solution: Hashable | None = None
    value: float | None = None
    reason: str | None = None
    reply: str | None = None

    @property
    def evaluated(self) -> bool:
        return self.status in ("initial", "valid")


@dataclass
class NumericStep:
    """What one step did.

    Attributes:
        step: The step number (1, 2, ...).
        samples: Requests made (every round included; failed ones too).
        valid: New solutions evaluated.
        duplicates: Valid solutions that had been evaluated before.
        invalid: Replies without a valid solution.
        errors: Requests that failed.
        best_value: The best value known after the step.
        meta_prompt: The meta-prompt sent at this step.
    """

    step: int
    samples: int
    valid: int
    duplicates: int
    invalid: int
    errors: int
    best_value: float
    meta_prompt: str


@dataclass
class NumericCounts(CountsRecord):
    """What a run has spent and discarded.

    Attributes:
        samples: Requests made to the prompt model: replies and failed requests.
        valid: New valid solutions among the replies (each evaluated once).
        duplicates: Valid solutions already evaluated (not evaluated again).
        invalid: Replies without a valid solution, by reason.
        errors: Requests that failed (retried ones included); never a proposal.
        evaluations: Objective evaluations, starting solutions included.
        lm: The prompt model's calls and tokens (`dspy_opro.counting.CallStats`).
    """

    ROLES = {"prompt": "lm"}

    samples: int = 0
    valid: int = 0
    duplicates: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    evaluations: int = 0
    lm: CallStats = field(default_factory=CallStats)

    @property
    def invalid_total(self) -> int:
        return sum(self.invalid.values())


@dataclass
class OptimizationResult:
    """The outcome of `optimize`.

    Attributes:
        problem: The problem's name.
        minimize: Whether lower values are better.
        best_solution: The best solution evaluated (a starting one if nothing better came).
        best_value: Its value.
        optimum: The problem's known optimum, if any.
        optimum_step: The first step whose proposals reached the known optimum (0: a starting
            solution), if any did.
        stop_reason: ``"optimum"``, ``"num_steps"`` or ``"max_calls"``.
        best_per_step: The best value after the starting solutions (index 0) and after each step.
        proposals: Every starting solution, every reply and every failed request, in order.
        steps: One record per step run.
        counts: Calls, rejections and evaluations.
    """

    problem: str
    minimize: bool
    best_solution: Hashable
    best_value: float
    optimum: float | None
    optimum_step: int | None
    stop_reason: str
    best_per_step: list[float]
    proposals: list[Proposal]
    steps: list[NumericStep]
    counts: NumericCounts

    @property
    def reached_optimum(self) -> bool:
        return self.optimum_step is not None

    @property
    def steps_run(self) -> int:
        return len(self.steps)

    @property
    def unique_proposed(self) -> int:
        """Distinct new solutions the prompt model proposed and the run evaluated (starts excluded)."""
        return sum(1 for p in self.proposals if p.status == "valid")


@dataclass
class _Pending:
    """A step that started and has not ended: its meta-prompt, its sampling rounds and what they gave."""

    step: int
    meta_prompt: str
    rounds: int = 0
    proposals: list[Proposal] = field(default_factory=list)


@dataclass
class _State:
    fingerprint: dict[str, Any]
    proposals: list[Proposal] = field(default_factory=list)
    steps: list[NumericStep] = field(default_factory=list)
    counts: NumericCounts = field(default_factory=NumericCounts)
    stop_reason: str | None = None
    pending: _Pending | None = None

    def to_json(self, problem: Problem) -> dict[str, Any]:
        def proposals(items: Sequence[Proposal]) -> list[dict[str, Any]]:
            out = []
            for proposal in items:
                data = asdict(proposal)
                data["solution"] = None if proposal.solution is None else problem.to_json(proposal.solution)
                out.append(data)
            return out

        pending = None
        if self.pending is not None:
            pending = {**asdict(self.pending), "proposals": proposals(self.pending.proposals)}
        return {
            "problem": problem.name,
            "fingerprint": self.fingerprint,
            "stop_reason": self.stop_reason,
            "counts": self.counts.as_dict(),
            "proposals": proposals(self.proposals),
            "steps": [asdict(s) for s in self.steps],
            "pending": pending,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], problem: Problem) -> _State:
        def proposals(items: Sequence[dict[str, Any]]) -> list[Proposal]:
            out = []
            for item in items:
                item = dict(item)
                item["solution"] = None if item["solution"] is None else problem.from_json(item["solution"])
                out.append(Proposal(**item))
            return out

        try:
            pending = data.get("pending")
            return cls(
                fingerprint=data["fingerprint"],
                proposals=proposals(data["proposals"]),
                steps=[NumericStep(**s) for s in data["steps"]],
                counts=NumericCounts.from_dict(data.get("counts", {})),
                stop_reason=data.get("stop_reason"),
                pending=None
                if pending is None
                else _Pending(**{**pending, "proposals": proposals(pending["proposals"])}),
            )
        except KeyError as exc:
            raise ValueError(f"it has no {exc.args[0]!r} entry") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"an entry is malformed ({exc})") from None


def load_history(log_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON history a run wrote to ``log_dir`` (plain data, for inspection)."""
    path = Path(log_dir) / CHECKPOINT_NAME
    return json.loads(path.read_text(encoding="utf-8"))
