"""What every OPRO run shares, instruction OPRO and numeric OPRO alike: the run kit.

- Argument checks (`check_int`, `check_temperature`) and renamed arguments (`take_renamed`: an old name
  still works for one release, with a `DeprecationWarning`, and errors name the argument as it was given).
- The run's state in ``log_dir``: a versioned JSON file replaced atomically (`Checkpoint`), and the call
  ledger beside it (`dspy_opro.counting.CallLedger`). `RunKit` loads or starts the state, refuses to resume
  a file written for another run with a message naming what differs (`fingerprint`, `differences`),
  counts each model role's calls (`RunKit.counter`), saves, and saves before a stop (`RunKit.stopped`).
- The progress bar over steps (`Progress`) and the counts serialiser (`CountsRecord`).

What a failed model call means, and when a run stops for failures, is `dspy_opro.calls` (scoring:
`dspy_opro.scoring`; proposing: `dspy_opro.sampling.ask`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import dspy
from tqdm.auto import tqdm

from .counting import CallCounter, CallLedger, CallStats

logger = logging.getLogger(__name__)

State = TypeVar("State")

DETAILS = "details"  # the fingerprint's plain-data part, which only explains a refusal
_SHOWN_CHARS = 120  # a differing value is shown in a refusal up to this length
NOT_SAVED = object()  # a part the saved fingerprint does not detail (written before details were kept)


# ---------------------------------------------------------------------------------------- arguments
def check_int(name: str, value: Any, *, minimum: int | None) -> None:
    """A `TypeError` unless ``value`` is an integer (not a bool), a `ValueError` if it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def check_temperature(value: Any, name: str = "temperature") -> float:
    """``value`` as a float if it is a number in [0, 2], else a `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise ValueError(f"{name} must be a number in [0, 2], got {value!r}")
    return float(value)


@dataclass
class Arguments:
    """Argument values under their current names, and the name each was given under."""

    values: dict[str, Any]
    spelled: dict[str, str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def name(self, name: str) -> str:
        """The name the caller used for the argument ``name`` (an old name, or ``name`` itself)."""
        return self.spelled.get(name, name)


def take_renamed(extra: dict[str, Any], renames: Mapping[str, str], **current: Any) -> Arguments:
    """Apply arguments given under their former names.

    Each old name found in ``extra`` is removed from it, warns with a `DeprecationWarning`, and sets its
    new name in place of the value in ``current``.

    Args:
        extra: The caller's leftover keyword arguments; renamed ones are taken out.
        renames: Old name -> new name.
        **current: The values of the new names as the caller received them.

    Returns:
        The values by new name, and the name each was given under.
    """
    values, spelled = dict(current), {}
    for old, new in renames.items():
        if old not in extra:
            continue
        value = extra.pop(old)
        warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)
        values[new], spelled[new] = value, old
    return Arguments(values, spelled)


def former_name(module: str, name: str, former: Mapping[str, tuple[str, Callable[[], Any]]]) -> Any:
    """For a module's ``__getattr__``: the value of a former public name, with a `DeprecationWarning`.

    Args:
        module: The module's ``__name__``.
        name: The attribute asked for.
        former: Former name -> (what to use instead, in words; a function returning the value).
    """
    if name not in former:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    instead, value = former[name]
    warnings.warn(f"{module}.{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=3)
    return value()


# ---------------------------------------------------------------------------------------- the state file
def digest(value: Any) -> str:
    """A stable short hash of JSON-like data (unknown objects hash by their repr)."""
    text = json.dumps(value, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def plain(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists, unknown objects their repr)."""
    return json.loads(json.dumps(value, default=repr))


def fingerprint(parts: Mapping[str, Any], details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a run: a digest of each part, and plain data that explains them (`DETAILS`: the
    parts themselves unless ``details`` gives shorter summaries, e.g. one digest per example) so that a
    refused resume can say what differs. A resume needs every digest to match."""
    explained = parts if details is None else details
    return {
        **{key: digest(value) for key, value in parts.items()},
        DETAILS: {k: plain(v) for k, v in explained.items()},
    }


def run_id(prints: Mapping[str, Any]) -> str:
    """The name of a run in its call ledger: the digests of its fingerprint."""
    return digest({key: value for key, value in prints.items() if key != DETAILS})


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def differences(key: str, here: Any, saved: Any) -> str:
    """What differs between this run's part ``key`` and the saved one, in words ("" when it cannot say).

    ``saved`` is `NOT_SAVED` for a file written before fingerprints kept their details.

    Dicts (settings, a problem) are compared entry by entry; lists (data sets, as lists of example
    digests) by length, then by their first differing example.
    """
    if saved is NOT_SAVED:
        return ""
    if isinstance(here, dict) and isinstance(saved, dict):
        changed = [
            f"{name}: {_shown(here.get(name))} here, {_shown(saved.get(name))} in the file"
            for name in sorted(set(here) | set(saved))
            if here.get(name) != saved.get(name)
        ]
        return f" ({'; '.join(changed)})" if changed else ""
    if here is None or saved is None or isinstance(here, list) and isinstance(saved, list):
        count = lambda items: "none" if items is None else len(items)  # noqa: E731
        if here is None or saved is None or len(here) != len(saved):
            return f" ({count(here)} examples here, {count(saved)} in the file)"
        first = next((j for j, (a, b) in enumerate(zip(here, saved, strict=True)) if a != b), None)
        return "" if first is None else f" (example {first} differs)"
    return ""


class Checkpoint:
    """A run's state as one versioned JSON file in ``log_dir``, replaced atomically on every write.

    A crash at any moment leaves either the previous complete file or the new one, never a
    partial file. Nothing is pickled; API keys never enter the state.

    Args:
        log_dir: The directory (created if needed).
        name: The file name.
        version: The format version written and required on reading.
    """

    def __init__(self, log_dir: str | os.PathLike, *, name: str, version: int):
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


# ---------------------------------------------------------------------------------------- counts
class CountsRecord:
    """A dataclass of counts that reads and writes itself as plain data.

    Its int and dict fields are written under their names, its `CallStats` fields (one per model role)
    under ``JSON_NAMES``. ``ROLES`` maps each model role (``"task"``, ``"prompt"``) to its field.
    """

    ROLES: ClassVar[dict[str, str]] = {}
    JSON_NAMES: ClassVar[dict[str, str]] = {}

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            key = self.JSON_NAMES.get(spec.name, spec.name)
            data[key] = (
                value.as_dict() if isinstance(value, CallStats) else dict(value) if isinstance(value, dict) else value
            )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        values: dict[str, Any] = {}
        stats_fields = set(cls.ROLES.values())
        for spec in dataclasses.fields(cls):
            key = cls.JSON_NAMES.get(spec.name, spec.name)
            if spec.name in stats_fields:
                values[spec.name] = CallStats.from_dict(data.get(key, {}))
            elif key in data:
                value = data[key]
                values[spec.name] = dict(value) if isinstance(value, dict) else value
        return cls(**values)

    def stats(self, role: str) -> CallStats:
        """The call statistics of a model role."""
        return getattr(self, self.ROLES[role])


# ---------------------------------------------------------------------------------------- the kit
class RunKit(Generic[State]):
    """The resumable frame of one run: its state, state file, call ledger, call counters and stops.

    With ``log_dir`` the state is loaded from the state file when one exists and was written for this run
    (the same `fingerprint`; otherwise the resume is refused with what differs), and the call ledger beside
    it supplies every earlier process's call counts, including the calls made after the last save.

    Args:
        log_dir: Where the state file and the ledger live; ``None`` keeps the run in memory.
        history_name: The state file's name.
        ledger_name: The ledger's name.
        version: The state file's format version.
        prints: The run's `fingerprint`.
        start: A new state for the fingerprint.
        load: The state from the file's data (a `ValueError` says what is missing or malformed).
        dump: The state as plain data for the file.
        counts: The state's `CountsRecord`.
        what: The run in words, for messages (``"an OPRO run"``).
        describe: Per fingerprint part, a function saying what differs (default `differences`).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None,
        *,
        history_name: str,
        ledger_name: str,
        version: int,
        prints: dict[str, Any],
        start: Callable[[dict[str, Any]], State],
        load: Callable[[dict[str, Any]], State],
        dump: Callable[[State], dict[str, Any]],
        counts: Callable[[State], CountsRecord],
        what: str,
        describe: Mapping[str, Callable[[str, Any, Any], str]] | None = None,
    ):
        self.prints = prints
        self.what = what
        self.ledger_name = ledger_name
        self._dump = dump
        self.checkpoint = None if log_dir is None else Checkpoint(log_dir, name=history_name, version=version)
        if self.checkpoint is not None:
            self.checkpoint.check_writable()
        self.resumed = False
        self.state: State = self._load_or_start(start, load, describe or {})
        self.counts = counts(self.state)
        self.ledger = self._open_ledger()

    def _load_or_start(self, start, load, describe) -> State:
        if self.checkpoint is None:
            return start(self.prints)
        data = self.checkpoint.read()
        if data is None:
            return start(self.prints)
        try:
            state = load(data)
        except ValueError as exc:
            raise ValueError(
                f"the history in {str(self.checkpoint.path)!r} is incomplete or damaged: {exc}. It cannot be "
                "resumed; move it away (or use a new log_dir) to start a new run."
            ) from None
        saved_prints = getattr(state, "fingerprint", None) or {}
        differing = [key for key in self.prints if key != DETAILS and saved_prints.get(key) != self.prints[key]]
        if differing:
            saved = saved_prints.get(DETAILS) or {}
            parts = []
            for key in differing:
                explain = describe.get(key, differences)
                parts.append(
                    f"a different {key}{explain(key, self.prints[DETAILS].get(key), saved.get(key, NOT_SAVED))}"
                )
            raise ValueError(
                f"{str(self.checkpoint.path)!r} holds {self.what} with {' and '.join(parts)}; refusing to resume "
                f"it. Use a new log_dir for this run, or delete that file (and {self.ledger_name}) to start over."
            )
        self.resumed = True
        return state

    def _open_ledger(self) -> CallLedger | None:
        """The call ledger in log_dir; the counts it holds (calls after the last save included) replace the saved ones."""
        if self.checkpoint is None:
            return None
        ledger = CallLedger(self.checkpoint.dir / self.ledger_name)
        totals = ledger.open(run_id(self.prints))
        if totals is not None:
            for role, attribute in self.counts.ROLES.items():
                setattr(self.counts, attribute, totals.get(role, getattr(self.counts, attribute)))
        else:  # a new ledger (or a history without one): it starts from the saved counts
            for role in self.counts.ROLES:
                stats = self.counts.stats(role)
                if stats.calls:
                    ledger.write_base(role, stats)
        return ledger

    def counter(self, role: str) -> CallCounter:
        """A counter of ``role``'s calls into the state's counts and the ledger, passing usage on to DSPy's tracker."""
        return CallCounter(
            self.counts.stats(role), role=role, forward_to=dspy.settings.usage_tracker, ledger=self.ledger
        )

    @property
    def path(self) -> Path | None:
        return None if self.checkpoint is None else self.checkpoint.path

    def save(self) -> None:
        """Write the state file (nothing without ``log_dir``)."""
        if self.checkpoint is not None:
            self.checkpoint.write(self._dump(self.state))

    def stopped(self, error: Exception) -> None:
        """Save everything measured before ``error`` stopped the run, and say in the error where it is."""
        self.save()
        if self.checkpoint is not None:
            error.saved_to = str(self.checkpoint.path)
        else:
            error.unsaved = True
        logger.error("OPRO stopped: %s", error)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()


class Progress:
    """A progress bar over a run's steps, showing the best value so far; nothing when ``show`` is false."""

    def __init__(self, *, total: int, done: int, desc: str, show: bool, best: str):
        self._bar = tqdm(total=total, initial=min(done, total), desc=desc, unit="step", disable=not show)
        self._bar.set_postfix(best=best)

    def advance(self, best: str) -> None:
        self._bar.update(1)
        self._bar.set_postfix(best=best)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
