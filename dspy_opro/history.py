"""The run history: every scored candidate, the per-step trajectory, and its JSON checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .models import Counts

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: failed examples are never scores; a stopped step is kept as `pending`
CHECKPOINT_NAME = "opro_history.json"
LEDGER_NAME = "opro_calls.jsonl"


@dataclass
class Candidate:
    """One scored program configuration.

    Attributes:
        id: Position in the run's history (0, 1, ...).
        step: 0 for the initial instructions, then the optimization step that proposed it.
        predictor: Name of the predictor whose instruction this candidate changes.
        instruction: That predictor's instruction.
        instructions: The instruction of every predictor in this configuration.
        score: Training score, 0-100 (mean metric x 100).
        per_example: Per-training-example metric values, in trainset order; ``None`` where
            screening stopped before running the example.
        failures: Failed runs while scoring it (after retries; runs repeated until they succeeded).
        evaluated: How many training examples were scored (all, unless screening stopped it;
            then ``score`` is the mean over those).
        val_score: Validation score, 0-100, once every validation example was scored.
        program_errors: Training examples on which the program or the metric raised. A candidate
            with any is incomplete: never chosen, validated, taken as the best, or shown to the
            prompt model.
        validation: Its results on the validation set (`dspy_opro.scoring.Evaluation` as JSON,
            plus ``"done"`` once its validation pass ended), if it was validated.
    """

    id: int
    step: int
    predictor: str
    instruction: str
    instructions: dict[str, str]
    score: float
    per_example: list[float | None]
    failures: int = 0
    evaluated: int = 0
    val_score: float | None = None
    program_errors: list[int] = field(default_factory=list)
    validation: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """Scored on every example it was run on (screening may have stopped it early)."""
        return not self.program_errors

    def summary(self) -> dict[str, Any]:
        """The candidate without its per-example results."""
        data = asdict(self)
        data.pop("per_example")
        data.pop("validation")
        return data


@dataclass
class StepRecord:
    """What happened at one optimization step."""

    step: int
    predictor: str
    exemplars: list[int]
    meta_prompt: str
    proposals: int
    new_candidates: list[int]
    best_score: float
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

    fingerprint: dict[str, str]
    candidates: list[Candidate] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    best_id: int | None = None
    best_traces: list[dict[str, dict[str, str]]] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    selection: dict[str, Any] | None = None
    pending: PendingStep | None = None

    @property
    def completed_steps(self) -> int:
        return self.steps[-1].step if self.steps else 0

    @property
    def best(self) -> Candidate | None:
        return None if self.best_id is None else self.candidates[self.best_id]

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "best_id": self.best_id,
            "counts": self.counts.as_dict(),
            "selection": self.selection,
            "candidates": [asdict(c) for c in self.candidates],
            "steps": [asdict(s) for s in self.steps],
            "best_traces": self.best_traces,
            "pending": None if self.pending is None else asdict(self.pending),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        """Read `to_json`'s output; a `ValueError` says what is missing or malformed."""
        try:
            pending = data.get("pending")
            state = cls(
                fingerprint=dict(data["fingerprint"]),
                candidates=[Candidate(**c) for c in data["candidates"]],
                steps=[StepRecord(**s) for s in data["steps"]],
                best_id=data["best_id"],
                best_traces=data.get("best_traces", []),
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
        return state


def digest(value: Any) -> str:
    """A stable short hash of JSON-like data (unknown objects hash by their repr)."""
    text = json.dumps(value, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Checkpoint:
    """A run history as one versioned JSON file in ``log_dir``, replaced atomically on every write.

    A crash at any moment leaves either the previous complete file or the new one, never a
    partial file. Nothing is pickled; API keys never enter the state. `load`/`save` read and
    write the prompt optimizer's `RunState`; `read`/`write` move plain JSON data for other loops.

    Args:
        log_dir: The directory (created if needed).
        name: The file name.
        version: The format version written and required on reading.
    """

    def __init__(self, log_dir: str | os.PathLike, *, name: str = CHECKPOINT_NAME, version: int = FORMAT_VERSION):
        self.dir = Path(log_dir)
        self.path = self.dir / name
        self.version = version

    def check_writable(self) -> None:
        """Fail early, before any LM call, if ``log_dir`` cannot be written."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.dir, prefix=".write-test-", delete=True)
            probe.close()
        except OSError as exc:
            raise ValueError(
                f"log_dir {str(self.dir)!r} is not writable ({exc.strerror or exc}); pass a directory you can "
                "write to, or log_dir=None to run without a checkpoint"
            ) from exc

    def read(self) -> dict[str, Any] | None:
        """The saved data, or ``None`` if nothing was saved yet."""
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot read the history in {str(self.path)!r}: {exc}. Move the file away to start a new run."
            ) from exc
        if not isinstance(data, dict):
            raise ValueError(
                f"{str(self.path)!r} is not a run history (it holds a JSON {type(data).__name__}). Move the file away "
                "to start a new run."
            )
        if data.get("format_version") != self.version:
            raise ValueError(
                f"{str(self.path)!r} was written by an incompatible version (format "
                f"{data.get('format_version')!r}, expected {self.version}); use a new log_dir."
            )
        return data

    def write(self, data: dict[str, Any]) -> None:
        """Replace the file with ``data`` (plus the format version), atomically and durably."""
        text = json.dumps({**data, "format_version": self.version}, ensure_ascii=False, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{self.path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> RunState | None:
        data = self.read()
        if data is None:
            return None
        try:
            return RunState.from_json(data)
        except ValueError as exc:
            raise ValueError(
                f"the history in {str(self.path)!r} is incomplete or damaged: {exc}. It cannot be resumed; move it "
                "away (or use a new log_dir) to start a new run."
            ) from None

    def save(self, state: RunState) -> None:
        self.write(state.to_json())
