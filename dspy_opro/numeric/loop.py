"""The OPRO loop for black-box objectives: propose, check, evaluate, show the best, repeat.

Each step builds one meta-prompt from the best scored solutions so far (worst first, best
last), samples ``proposals_per_step`` independent replies from the prompt model, reads a
solution out of each, drops invalid ones and ones already evaluated, and evaluates the rest.
When fewer than ``proposals_per_step`` new valid solutions came back, it samples again for
the missing ones, but never more than ``max_samples_per_step`` replies in a step: a model that
only writes invalid solutions costs a bounded number of calls and the run still ends. The
run stops after ``num_steps`` steps, when a proposal reaches the problem's known optimum, when
``max_calls`` replies have been sampled, or when the prompt model has failed on every call
for several steps in a row.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy
from tqdm.auto import tqdm

from dspy_opro.history import Checkpoint, digest
from dspy_opro.models import (
    CallCounter,
    CallStats,
    lm_name,
    meta_prompt_family,
    optimizer_model,
    resolve_lm,
    sample_replies,
)

from .problem import STYLES, InvalidProposal, Problem, Scored, render_meta_prompt

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_NAME = "opro_numeric_history.json"
MAX_REPLY_CHARS = 2000  # replies are kept in the history for inspection, cut to this length
STOP_AFTER_FAILED_STEPS = 3  # steps in a row on which every call raised before the run gives up

STOP_REASONS = ("optimum", "num_steps", "max_calls", "lm_errors")


@dataclass
class Proposal:
    """One solution the run considered: a starting solution or one reply of the prompt model.

    Attributes:
        step: 0 for starting solutions, else the step that sampled the reply.
        sample: Position of the reply within its step (or of the starting solution).
        status: ``"initial"``, ``"valid"`` (new and evaluated), ``"duplicate"`` (already
            evaluated), ``"invalid"`` (no valid solution in the reply) or ``"error"`` (the call
            raised).
        solution: The solution read from the reply, if any.
        value: Its objective value, for ``"initial"`` and ``"valid"``.
        reason: Why an invalid reply was rejected, or the error of a failed call.
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
class StepRecord:
    """What one step did.

    Attributes:
        step: The step number (1, 2, ...).
        samples: Replies sampled (every round included).
        valid: New solutions evaluated.
        duplicates: Valid solutions that had been evaluated before.
        invalid: Replies without a valid solution.
        errors: Calls that raised.
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
class NumericCounts:
    """What a run has spent and discarded.

    Attributes:
        samples: Replies requested from the prompt model.
        valid: New valid solutions among them (each evaluated once).
        duplicates: Valid solutions already evaluated (not evaluated again).
        invalid: Replies without a valid solution, by reason.
        errors: Replies whose call raised.
        evaluations: Objective evaluations, starting solutions included.
        lm: Calls and tokens as seen by DSPy's callbacks and usage tracker.
    """

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "valid": self.valid,
            "duplicates": self.duplicates,
            "invalid": dict(self.invalid),
            "errors": self.errors,
            "evaluations": self.evaluations,
            "lm": self.lm.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NumericCounts:
        return cls(
            samples=data.get("samples", 0),
            valid=data.get("valid", 0),
            duplicates=data.get("duplicates", 0),
            invalid=dict(data.get("invalid", {})),
            errors=data.get("errors", 0),
            evaluations=data.get("evaluations", 0),
            lm=CallStats.from_dict(data.get("lm", {})),
        )


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
        stop_reason: ``"optimum"``, ``"num_steps"``, ``"max_calls"`` or ``"lm_errors"``.
        best_per_step: The best value after the starting solutions (index 0) and after each step.
        proposals: Every starting solution and every reply, in order.
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
    steps: list[StepRecord]
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


# ------------------------------------------------------------------------------------------------
# The run history and its checkpoint


@dataclass
class _State:
    fingerprint: dict[str, str]
    proposals: list[Proposal] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    counts: NumericCounts = field(default_factory=NumericCounts)
    stop_reason: str | None = None

    def to_json(self, problem: Problem) -> dict[str, Any]:
        proposals = []
        for proposal in self.proposals:
            data = asdict(proposal)
            data["solution"] = None if proposal.solution is None else problem.to_json(proposal.solution)
            proposals.append(data)
        return {
            "problem": problem.name,
            "fingerprint": self.fingerprint,
            "stop_reason": self.stop_reason,
            "counts": self.counts.as_dict(),
            "proposals": proposals,
            "steps": [asdict(s) for s in self.steps],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], problem: Problem) -> _State:
        proposals = []
        for item in data["proposals"]:
            item = dict(item)
            item["solution"] = None if item["solution"] is None else problem.from_json(item["solution"])
            proposals.append(Proposal(**item))
        return cls(
            fingerprint=data["fingerprint"],
            proposals=proposals,
            steps=[StepRecord(**s) for s in data["steps"]],
            counts=NumericCounts.from_dict(data.get("counts", {})),
            stop_reason=data.get("stop_reason"),
        )


# ------------------------------------------------------------------------------------------------
# The loop


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def resolve_style(style: str, lm: Any) -> str:
    """``"auto"`` becomes the style `dspy_opro.models.meta_prompt_family` picks for ``lm`` (the rule
    instruction OPRO uses too): ``"base"`` for the embedded local models and text-completion LMs,
    ``"chat"`` otherwise."""
    if style == "auto":
        return meta_prompt_family(lm)
    if style not in STYLES:
        raise ValueError(f"style must be 'auto' or one of {STYLES}, got {style!r}")
    return style


def make_prompt_model(spec: str, *, style: str = "auto", max_tokens: int = 512) -> tuple[dspy.BaseLM, str]:
    """A prompt model for a meta-prompt style, from a litellm model string.

    ``"auto"`` picks ``"base"`` (a list continued as a raw text completion) for the embedded
    local models and ``"chat"`` for everything else; see `dspy_opro.models.optimizer_model`.

    Args:
        spec: A litellm model string, e.g. ``"local/smollm2"`` or ``"openai/gpt-4o-mini"``.
        style: ``"auto"``, ``"chat"`` or ``"base"``.
        max_tokens: Longest reply.

    Returns:
        The LM and the resolved style.
    """
    if style not in ("auto", *STYLES):
        raise ValueError(f"style must be 'auto' or one of {STYLES}, got {style!r}")
    return optimizer_model(spec, family=style, max_tokens=max_tokens)


def optimize(
    problem: Problem,
    *,
    prompt_model: dspy.BaseLM | str | None = None,
    num_steps: int = 50,
    proposals_per_step: int = 8,
    max_samples_per_step: int | None = None,
    temperature: float = 1.0,
    max_shown: int | None = None,
    style: str = "auto",
    stop_at_optimum: bool = True,
    max_calls: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    log_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> OptimizationResult:
    """Optimize a black-box objective by prompting: OPRO on a `Problem`.

    Example::

        from dspy_opro.numeric import LinearRegression, optimize

        result = optimize(LinearRegression(w_true=15, b_true=14), prompt_model="openai/gpt-4o-mini", num_steps=50)
        print(result.best_solution, result.optimum_step)

    Args:
        problem: The objective, its meta-prompt and its parser.
        prompt_model: The model that proposes solutions: a ``dspy.LM`` or a litellm model string.
            Defaults to ``dspy.settings.lm``.
        num_steps: Most optimization steps.
        proposals_per_step: New valid solutions wanted per step (the paper: 8), each from an
            independent sample.
        max_samples_per_step: Most replies sampled in one step. Defaults to
            ``proposals_per_step``: one round, invalid replies are not replaced (the paper's
            linear regression). A larger value re-samples for invalid and duplicate replies up to
            this cap (the paper's TSP asks until it has 8 valid tours, with no cap).
        temperature: Sampling temperature (the paper: 1.0).
        max_shown: How many of the best solutions the meta-prompt shows; the problem's
            ``default_max_shown`` by default (the paper: 20 for regression, 10 for TSP).
        style: ``"chat"`` (instruction-tuned models), ``"base"`` (pretrained or tiny models,
            as a plain text completion), or ``"auto"``: `dspy_opro.models.meta_prompt_family`'s
            choice, ``"base"`` for the embedded local models and text-completion LMs
            (``model_type="text"``, e.g. `dspy_opro.local.text_lm`), ``"chat"`` otherwise. A model
            string for ``"base"`` becomes a text-completion LM.
        stop_at_optimum: Stop after the step in which a proposal reaches ``problem.optimum``.
        max_calls: Hard cap on replies sampled over the whole run (resumed runs included).
        seed: Seeds the samples' rollout ids; with DSPy's cache on, a rerun repeats the run.
        num_threads: Threads for sampling. Defaults to ``dspy.settings.num_threads``.
        log_dir: Directory for the JSON history, replaced atomically after every step. A call
            with the same problem, model and settings resumes from it.
        show_progress: Show a progress bar over steps.

    Returns:
        The best solution, the per-step trajectory and every proposal with its fate.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a dspy_opro.numeric.Problem, got {type(problem).__name__}")
    _check_int("num_steps", num_steps, minimum=0)
    _check_int("proposals_per_step", proposals_per_step, minimum=1)
    if max_samples_per_step is None:
        max_samples_per_step = proposals_per_step
    _check_int("max_samples_per_step", max_samples_per_step, minimum=proposals_per_step)
    if max_shown is not None:
        _check_int("max_shown", max_shown, minimum=1)
    if max_calls is not None:
        _check_int("max_calls", max_calls, minimum=1)
    if num_threads is not None:
        _check_int("num_threads", num_threads, minimum=1)
    _check_int("seed", seed, minimum=-(2**63))
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be a number in [0, 2], got {temperature!r}")
    if style not in ("auto", *STYLES):
        raise ValueError(f"style must be 'auto' or one of {STYLES}, got {style!r}")
    if isinstance(prompt_model, str):  # built for its style: the embedded models get a text-completion LM
        lm, style = optimizer_model(prompt_model, family=style, max_tokens=None)
    else:
        lm = resolve_lm(prompt_model, role="prompt_model") or dspy.settings.lm
    if lm is None:
        raise ValueError("no prompt model: pass prompt_model=... (a dspy.LM or a litellm model string)")

    settings = _Settings(
        style=resolve_style(style, lm),
        proposals_per_step=proposals_per_step,
        max_samples_per_step=max_samples_per_step,
        temperature=float(temperature),
        max_shown=problem.default_max_shown if max_shown is None else max_shown,
        stop_at_optimum=stop_at_optimum,
        max_calls=max_calls,
        seed=seed,
        num_threads=num_threads or dspy.settings.num_threads or 1,
    )
    return _Run(problem, lm, settings, log_dir=log_dir).execute(num_steps, show_progress=show_progress)


@dataclass(frozen=True)
class _Settings:
    style: str
    proposals_per_step: int
    max_samples_per_step: int
    temperature: float
    max_shown: int
    stop_at_optimum: bool
    max_calls: int | None
    seed: int
    num_threads: int

    def shaping_the_samples(self) -> dict[str, Any]:
        """The settings a resumed run must share; caps, threads and the stopping rule may change."""
        data = asdict(self)
        for key in ("max_calls", "num_threads", "stop_at_optimum"):
            data.pop(key)
        return data


class _Run:
    """One call of `optimize`: its settings, state and checkpoint."""

    def __init__(self, problem: Problem, lm: dspy.BaseLM, settings: _Settings, *, log_dir: str | os.PathLike | None):
        self.problem = problem
        self.lm = lm
        self.settings = settings
        self.fingerprint = {
            "problem": digest(problem.fingerprint()),
            "settings": digest({**settings.shaping_the_samples(), "prompt_model": lm_name(lm)}),
        }
        self.checkpoint = (
            Checkpoint(log_dir, name=CHECKPOINT_NAME, version=FORMAT_VERSION) if log_dir is not None else None
        )
        if self.checkpoint is not None:
            self.checkpoint.check_writable()
        self.state = self._load_or_start()
        self.counts = self.state.counts
        self.counter = CallCounter(self.counts.lm, forward_to=dspy.settings.usage_tracker)
        self.seen: dict[Hashable, float] = {
            p.solution: p.value for p in self.state.proposals if p.evaluated and p.value is not None
        }

    def _load_or_start(self) -> _State:
        if self.checkpoint is None:
            return _State(fingerprint=self.fingerprint)
        data = self.checkpoint.read()
        state = None if data is None else _State.from_json(data, self.problem)
        if state is None:
            return _State(fingerprint=self.fingerprint)
        differing = [key for key in self.fingerprint if state.fingerprint.get(key) != self.fingerprint[key]]
        if differing:
            raise ValueError(
                f"{str(self.checkpoint.path)!r} holds a run with a different {' and '.join(differing)}; refusing "
                "to resume it. Use a new log_dir, or delete that file to start over."
            )
        logger.info("Resuming %s from %s after step %d", self.problem.name, self.checkpoint.path, len(state.steps))
        return state

    def _save(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.write(self.state.to_json(self.problem))

    # ------------------------------------------------------------------ bookkeeping
    def _history(self) -> list[Scored]:
        return [Scored(p.solution, p.value, p.step) for p in self.state.proposals if p.evaluated]

    def _best(self) -> Proposal:
        best = None
        for proposal in self.state.proposals:
            if proposal.evaluated and (best is None or self.problem.better(proposal.value, best.value)):
                best = proposal
        assert best is not None  # the starting solutions are always evaluated
        return best

    def _evaluate(self, solution: Hashable) -> float:
        self.counts.evaluations += 1
        value = float(self.problem.evaluate(solution))
        if not math.isfinite(value):
            raise InvalidProposal("non-finite value", repr(value))
        return value

    def _start(self) -> None:
        initial = list(dict.fromkeys(self.problem.initial_solutions()))
        if not initial:
            raise ValueError(f"{self.problem.name}: initial_solutions() returned nothing; OPRO needs a start")
        for index, solution in enumerate(initial):
            value = self._evaluate(solution)
            self.state.proposals.append(Proposal(0, index, "initial", solution, value))
            self.seen[solution] = value
        self._save()

    def _record(self, step: int, sample: int, reply: str | Exception) -> Proposal:
        self.counts.samples += 1
        if isinstance(reply, Exception):
            self.counts.errors += 1
            logger.warning("Prompt model call failed at step %d: %s: %s", step, type(reply).__name__, reply)
            return Proposal(step, sample, "error", reason=f"{type(reply).__name__}: {reply}"[:MAX_REPLY_CHARS])
        text = reply[:MAX_REPLY_CHARS]
        try:
            solution = self.problem.parse(reply, self.settings.style)
            if solution in self.seen:
                self.counts.duplicates += 1
                return Proposal(step, sample, "duplicate", solution, reply=text)
            value = self._evaluate(solution)
        except InvalidProposal as exc:
            self.counts.invalid[exc.reason] = self.counts.invalid.get(exc.reason, 0) + 1
            logger.debug("Invalid proposal at step %d (%s): %r", step, exc, reply[:200])
            return Proposal(step, sample, "invalid", reason=exc.reason, reply=text)
        self.counts.valid += 1
        self.seen[solution] = value
        return Proposal(step, sample, "valid", solution, value, reply=text)

    def _optimum_step(self) -> int | None:
        for proposal in self.state.proposals:
            if proposal.evaluated and self.problem.is_optimal(proposal.value):
                return proposal.step
        return None

    def _calls_left(self) -> float:
        return math.inf if self.settings.max_calls is None else self.settings.max_calls - self.counts.samples

    # ------------------------------------------------------------------ the loop
    def _step(self, step: int) -> StepRecord:
        prompt = render_meta_prompt(
            self.problem, self._history(), style=self.settings.style, max_shown=self.settings.max_shown
        )
        logger.debug("Meta-prompt at step %d:\n%s", step, prompt)
        new: list[Proposal] = []
        rounds = 0
        while True:
            valid = sum(p.status == "valid" for p in new)
            wanted = min(
                self.settings.proposals_per_step - valid,
                self.settings.max_samples_per_step - len(new),
                self._calls_left(),
            )
            if wanted <= 0:
                break
            replies = sample_replies(
                self.lm,
                prompt,
                int(wanted),
                temperature=self.settings.temperature,
                key=(self.settings.seed, step, rounds),
                counter=self.counter,
                stop=self.problem.stop(self.settings.style),
                num_threads=self.settings.num_threads,
            )
            batch = [self._record(step, len(new) + j, reply) for j, reply in enumerate(replies)]
            new += batch
            rounds += 1
            if (
                any(p.status == "valid" and self.problem.is_optimal(p.value) for p in batch)
                and self.settings.stop_at_optimum
            ):
                break
            if all(p.status == "error" for p in batch):
                break  # a failing model is not asked again within the step
        self.state.proposals += new
        best = self._best()
        record = StepRecord(
            step=step,
            samples=len(new),
            valid=sum(p.status == "valid" for p in new),
            duplicates=sum(p.status == "duplicate" for p in new),
            invalid=sum(p.status == "invalid" for p in new),
            errors=sum(p.status == "error" for p in new),
            best_value=best.value,
            meta_prompt=prompt,
        )
        self.state.steps.append(record)
        logger.info(
            "Step %d: %d samples, %d new, %d duplicate, %d invalid, %d failed; best %s = %.6g",
            step,
            record.samples,
            record.valid,
            record.duplicates,
            record.invalid,
            record.errors,
            self.problem.describe(best.solution),
            best.value,
        )
        return record

    def execute(self, num_steps: int, *, show_progress: bool) -> OptimizationResult:
        if not self.state.proposals:
            self._start()
        best = self._best()
        optimum = self.problem.optimum
        logger.info(
            "OPRO on %s: %d starting solution(s), best %.6g; up to %d steps of %d proposal(s) (at most %d samples "
            "per step), %s meta-prompt showing %d, known optimum %s",
            self.problem.name,
            sum(p.status == "initial" for p in self.state.proposals),
            best.value,
            num_steps,
            self.settings.proposals_per_step,
            self.settings.max_samples_per_step,
            self.settings.style,
            self.settings.max_shown,
            "unknown" if optimum is None else f"{optimum:.6g}",
        )
        failed_steps = 0
        first = len(self.state.steps) + 1
        stop_reason = "optimum" if self.settings.stop_at_optimum and self._optimum_step() is not None else None
        bar = tqdm(
            total=num_steps,
            initial=min(first - 1, num_steps),
            desc=f"OPRO {self.problem.name}",
            unit="step",
            disable=not show_progress,
        )
        bar.set_postfix(best=f"{best.value:.6g}")
        try:
            for step in range(first, num_steps + 1):
                if stop_reason is not None:
                    break
                if self._calls_left() <= 0:
                    stop_reason = "max_calls"
                    logger.info("max_calls=%d reached before step %d; stopping", self.settings.max_calls, step)
                    break
                record = self._step(step)
                bar.update(1)
                bar.set_postfix(best=f"{record.best_value:.6g}")
                failed_steps = failed_steps + 1 if record.samples and record.errors == record.samples else 0
                if self.settings.stop_at_optimum and self._optimum_step() is not None:
                    stop_reason = "optimum"
                elif failed_steps >= STOP_AFTER_FAILED_STEPS:
                    stop_reason = "lm_errors"
                    logger.error(
                        "The prompt model failed on every call for %d steps in a row; stopping. Check the model "
                        "(name, API key, rate limits, installed extras).",
                        failed_steps,
                    )
                self._save()
        finally:
            bar.close()
        self.state.stop_reason = stop_reason or "num_steps"
        self._save()
        return self._result()

    def _result(self) -> OptimizationResult:
        best = self._best()
        initial_best = None
        for p in self.state.proposals:
            if p.status == "initial" and (initial_best is None or self.problem.better(p.value, initial_best)):
                initial_best = p.value
        state = self.state
        optimum_step = self._optimum_step()
        if optimum_step is not None:
            logger.info("%s: reached the optimum %.6g at step %d", self.problem.name, best.value, optimum_step)
        elif self.counts.samples and self.counts.valid == 0:
            logger.warning(
                "%s: the prompt model proposed no new valid solution in %d samples (%d invalid, %d duplicates, "
                "%d failed); the result is the best starting solution.",
                self.problem.name,
                self.counts.samples,
                self.counts.invalid_total,
                self.counts.duplicates,
                self.counts.errors,
            )
        return OptimizationResult(
            problem=self.problem.name,
            minimize=self.problem.minimize,
            best_solution=best.solution,
            best_value=best.value,
            optimum=self.problem.optimum,
            optimum_step=optimum_step,
            stop_reason=state.stop_reason or "num_steps",
            best_per_step=[initial_best, *(s.best_value for s in state.steps)],
            proposals=list(state.proposals),
            steps=list(state.steps),
            counts=self.counts,
        )


def load_history(log_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON history a run wrote to ``log_dir`` (plain data, for inspection)."""
    path = Path(log_dir) / CHECKPOINT_NAME
    return json.loads(path.read_text(encoding="utf-8"))
