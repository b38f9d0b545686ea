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

FORMAT_VERSION = 1
CHECKPOINT_NAME = "opro_history.json"


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
        failures: Training examples on which the program or metric raised.
        evaluated: How many training examples were run (all, unless screening stopped it;
            then ``score`` is the mean over those).
        val_score: Validation score, 0-100, if it was measured.
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

    def summary(self) -> dict[str, Any]:
        """The candidate without its per-example scores."""
        data = asdict(self)
        data.pop("per_example")
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
class RunState:
    """Everything needed to resume a run and to report on it."""

    fingerprint: dict[str, str]
    candidates: list[Candidate] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    best_id: int | None = None
    best_traces: list[dict[str, dict[str, str]]] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    selection: dict[str, Any] | None = None

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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        return cls(
            fingerprint=data["fingerprint"],
            candidates=[Candidate(**c) for c in data["candidates"]],
            steps=[StepRecord(**s) for s in data["steps"]],
            best_id=data["best_id"],
            best_traces=data.get("best_traces", []),
            counts=Counts.from_dict(data.get("counts", {})),
            selection=data.get("selection"),
        )


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
        return None if data is None else RunState.from_json(data)

    def save(self, state: RunState) -> None:
        self.write(state.to_json())
