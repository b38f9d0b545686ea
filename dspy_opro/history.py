"""The state of an instruction OPRO run: its scored candidates, its steps, the step in flight and its counts.

Everything here is plain data that round-trips through the JSON history in ``log_dir``
(`dspy_opro.run.Checkpoint`). A candidate keeps its per-example results; its score, the number of
examples it was scored on and its validation score are derived from them (the history file also
writes them, for people reading it, and ignores them on reading).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from .counting import CallStats
from .run import CountsRecord
from .scoring import Evaluation, percent_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: failed examples are never scores; a stopped step is kept as `pending`
CHECKPOINT_NAME = "opro_history.json"
LEDGER_NAME = "opro_calls.jsonl"
ALL_PREDICTORS = "*"  # the `predictor` of the initial configuration shared by all predictors


@dataclass
class Counts(CountsRecord):
    """Everything a run has spent and discarded; saved with the run history.

    ``metric_calls`` counts scored (program, example) pairs: the runs that gave a score, which is
    what ``max_metric_calls`` caps; ``task_failures`` the runs that failed (after their retries).
    ``task`` and ``prompt`` are the two models' call statistics.
    """

    ROLES = {"task": "task", "prompt": "prompt"}
    JSON_NAMES = {"task": "task_lm", "prompt": "prompt_lm"}

    metric_calls: int = 0
    task_failures: int = 0
    task: CallStats = field(default_factory=CallStats)
    prompt: CallStats = field(default_factory=CallStats)
    proposals: int = 0
    unparsed: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


_DERIVED = ("instruction", "score", "evaluated", "val_score")


@dataclass
class Candidate:
    """One scored program configuration.

    Attributes:
        id: Position in the run's history (0, 1, ...).
        step: 0 for the initial instructions, then the optimization step that proposed it.
        predictor: Name of the predictor whose instruction this candidate changes (`ALL_PREDICTORS` for
            the starting configuration of a program with several predictors).
        instructions: The instruction of every predictor in this configuration, in the program's order.
        per_example: Per-training-example metric values, in trainset order; ``None`` where
            screening stopped before running the example.
        failures: Failed runs while scoring it (after retries; runs repeated until they succeeded).
        program_errors: Training examples on which the program or the metric raised. A candidate
            with any is incomplete: never chosen, validated, taken as the best, or shown to the
            prompt model.
        validation: Its results on the validation set (`dspy_opro.scoring.Evaluation` as JSON,
            plus ``"done"`` once its validation pass ended), if it was validated.
    """

    id: int
    step: int
    predictor: str
    instructions: dict[str, str]
    per_example: list[float | None]
    failures: int = 0
    program_errors: list[int] = field(default_factory=list)
    validation: dict[str, Any] | None = None

    @property
    def instruction(self) -> str:
        """The instruction of its predictor (the first predictor's for a starting configuration)."""
        if self.predictor in self.instructions:
            return self.instructions[self.predictor]
        return next(iter(self.instructions.values()))

    @property
    def score(self) -> float:
        """Training score, 0-100: the mean metric value over the examples it was scored on, x 100."""
        return percent_of(self.per_example)

    @property
    def evaluated(self) -> int:
        """How many training examples were scored (all, unless screening stopped it)."""
        return sum(s is not None for s in self.per_example)

    @property
    def val_score(self) -> float | None:
        """Validation score, 0-100, once every validation example was scored; else ``None``."""
        if not self.validation or not self.validation.get("done"):
            return None
        result = Evaluation.from_json(self.validation)
        return result.score if result.complete else None

    @property
    def complete(self) -> bool:
        """Scored on every example it was run on (screening may have stopped it early)."""
        return not self.program_errors

    def summary(self) -> dict[str, Any]:
        """The candidate without its per-example results (scores 0-100)."""
        return {
            "id": self.id,
            "step": self.step,
            "predictor": self.predictor,
            "instruction": self.instruction,
            "instructions": dict(self.instructions),
            "score": self.score,
            "failures": self.failures,
            "evaluated": self.evaluated,
            "val_score": self.val_score,
            "program_errors": list(self.program_errors),
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "per_example": list(self.per_example), "validation": self.validation}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        return cls(**{key: value for key, value in data.items() if key not in _DERIVED})


@dataclass
class StepRecord:
    """What happened at one optimization step (step 0: the initial instructions).

    Attributes:
        step: The step.
        predictor: The predictor it worked on (``""`` at step 0).
        exemplars: The training examples its meta-prompt showed.
        meta_prompt: The meta-prompt.
        proposals: Replies sampled.
        new_candidates: Ids of the candidates it added.
        best_id: The best candidate after the step.
    """

    step: int
    predictor: str
    exemplars: list[int]
    meta_prompt: str
    proposals: int
    new_candidates: list[int]
    best_id: int


@dataclass
class PendingStep:
    """A step that started and has not ended: what it has measured so far, to resume from.

    A run that stops (an outage, a fatal error) saves its step in flight here; the next
    ``compile`` with the same ``log_dir`` finishes it: it asks the prompt model only for the
    samples whose call failed, and scores only the examples without a score.

    Attributes:
        step: The step (0: the initial instructions).
        predictor: The predictor it works on (``"*"`` at step 0 with several predictors).
        exemplars: The training examples its meta-prompt shows.
        meta_prompt: The meta-prompt.
        replies: Per prompt-model sample, the reply, or ``None`` while it has none.
        configs: Once the replies are read: per candidate, the predictor it changes and the
            instructions of every predictor.
        budget: Metric calls the step may spend (``None``: no limit), fixed when it started scoring.
        final: The budget ends the run after this step.
        evaluations: Per candidate, its results so far (`dspy_opro.scoring.Evaluation` as JSON).
    """

    step: int
    predictor: str
    exemplars: list[int]
    meta_prompt: str
    replies: list[str | None] = field(default_factory=list)
    configs: list[tuple[str, dict[str, str]]] | None = None
    budget: int | None = None
    final: bool = False
    evaluations: list[dict[str, Any] | None] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PendingStep:
        configs = data.get("configs")
        return cls(**{**data, "configs": None if configs is None else [(p, dict(c)) for p, c in configs]})


@dataclass
class RunState:
    """Everything needed to resume a run and to report on it."""

    fingerprint: dict[str, Any]
    candidates: list[Candidate] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    best_id: int | None = None
    best_traces: list[dict[str, dict[str, str]]] = field(default_factory=list)
    best_notes: list[dict[str, Any]] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    selection: dict[str, Any] | None = None
    pending: PendingStep | None = None

    @property
    def completed_steps(self) -> int:
        return self.steps[-1].step if self.steps else 0

    @property
    def best(self) -> Candidate | None:
        return None if self.best_id is None else self.candidates[self.best_id]

    def step_log(self, record: StepRecord) -> dict[str, Any]:
        """A step as plain data, with the best score (0-100) after it."""
        data = asdict(record)
        best_id = data.pop("best_id")
        return {**data, "best_score": self.candidates[best_id].score, "best_id": best_id}

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "best_id": self.best_id,
            "counts": self.counts.as_dict(),
            "selection": self.selection,
            "candidates": [c.to_json() for c in self.candidates],
            "steps": [self.step_log(s) for s in self.steps],
            "best_traces": self.best_traces,
            "best_notes": self.best_notes,
            "pending": None if self.pending is None else asdict(self.pending),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        """Read `to_json`'s output; a `ValueError` says what is missing or malformed."""
        try:
            pending = data.get("pending")
            state = cls(
                fingerprint=dict(data["fingerprint"]),
                candidates=[Candidate.from_json(c) for c in data["candidates"]],
                steps=[StepRecord(**{k: v for k, v in s.items() if k != "best_score"}) for s in data["steps"]],
                best_id=data["best_id"],
                best_traces=data.get("best_traces", []),
                best_notes=data.get("best_notes", []),
                counts=Counts.from_dict(data.get("counts", {})),
                selection=data.get("selection"),
                pending=None if pending is None else PendingStep.from_json(pending),
            )
        except KeyError as exc:
            raise ValueError(f"it has no {exc.args[0]!r} entry") from None
        except (TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"an entry is malformed ({exc})") from None
        if state.best_id is not None and not 0 <= state.best_id < len(state.candidates):
            raise ValueError(f"its best_id {state.best_id} names no candidate")
        if any(not 0 <= s.best_id < len(state.candidates) for s in state.steps):
            raise ValueError("a step names no candidate as its best")
        return state
