"""The OPRO loop for black-box objectives: propose, check, evaluate, show the best, repeat.

Each step builds one meta-prompt from the best scored solutions so far (worst first, best
last), samples ``candidates_per_step`` independent replies from the prompt model, reads a
solution out of each, drops invalid ones and ones already evaluated, and evaluates the rest.
When fewer than ``candidates_per_step`` new valid solutions came back, it samples again for
the missing ones, but never more than ``max_samples_per_step`` replies in a step: a model that
only writes invalid solutions costs a bounded number of calls and the run still ends. The
run stops after ``num_steps`` steps, when a proposal reaches the problem's known optimum, or
when ``max_calls`` samples have been asked for.

Model calls follow the same policy as instruction OPRO (`dspy_opro.sampling.ask`): transient
failures are retried by OPRO and every request is counted; a failed request is recorded (status
``"error"``) but is never a proposal, and the sample is asked for again; a failure that retrying
cannot fix, or a round in which every call failed, stops the run with
`dspy_opro.calls.PromptModelError` after saving it, step in flight included, so that calling
`optimize` again with the same ``log_dir`` goes on from there. The run's frame (state file, resume
refusal, call ledger, progress) is `dspy_opro.run.RunKit`, as for instruction OPRO, and the run's state
is `dspy_opro.numeric.history`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dspy

from dspy_opro.calls import Outcome, PromptModelError, retries_of, without_retries
from dspy_opro.families import check_family, resolve_family
from dspy_opro.faults import describe
from dspy_opro.models import lm_name, optimizer_model, resolve_lm
from dspy_opro.run import Progress, RunKit, check_int, check_temperature, fingerprint, take_renamed
from dspy_opro.sampling import ask

from .history import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    LEDGER_NAME,
    MAX_REPLY_CHARS,
    NumericStep,
    OptimizationResult,
    Proposal,
    _Pending,
    _State,
)
from .problem import InvalidProposal, Problem, Scored, render_meta_prompt

logger = logging.getLogger(__name__)

RENAMED = {"proposals_per_step": "candidates_per_step", "style": "meta_prompt"}
"""`optimize`'s former argument names, accepted with a `DeprecationWarning` for one release (the names of
instruction OPRO are the names of both loops now)."""


def make_prompt_model(
    spec: str, *, meta_prompt: str = "auto", max_tokens: int = 512, **renamed: Any
) -> tuple[dspy.BaseLM, str]:
    """A prompt model for a meta-prompt family, from a litellm model string: `dspy_opro.models.optimizer_model`.

    ``"auto"`` picks ``"base"`` (a list continued as a raw text completion) for the embedded
    local models and ``"chat"`` for everything else.

    Args:
        spec: A litellm model string, e.g. ``"local/smollm2"`` or ``"openai/gpt-4o-mini"``.
        meta_prompt: ``"auto"``, ``"chat"`` or ``"base"`` (``style``, its former name, is accepted with a
            `DeprecationWarning`).
        max_tokens: Longest reply.

    Returns:
        The LM and the resolved family.
    """
    given = take_renamed(renamed, {"style": "meta_prompt"}, meta_prompt=meta_prompt)
    if renamed:
        raise TypeError(f"make_prompt_model() got an unexpected keyword argument {next(iter(renamed))!r}")
    family = check_family(given["meta_prompt"], Problem.families, argument=given.name("meta_prompt"), auto=True)
    return optimizer_model(spec, family=family, max_tokens=max_tokens)


def optimize(
    problem: Problem,
    *,
    prompt_model: dspy.BaseLM | str | None = None,
    num_steps: int = 50,
    candidates_per_step: int = 8,
    max_samples_per_step: int | None = None,
    temperature: float = 1.0,
    max_shown: int | None = None,
    meta_prompt: str = "auto",
    stop_at_optimum: bool = True,
    max_calls: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    log_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    **renamed: Any,
) -> OptimizationResult:
    """Optimize a black-box objective by prompting: OPRO on a `Problem`.

    Example::

        from dspy_opro.numeric import LinearRegression, optimize

        result = optimize(LinearRegression(w_true=15, b_true=14), prompt_model="openai/gpt-4o-mini", num_steps=50)
        print(result.best_solution, result.optimum_step)

    The arguments share their names with `dspy_opro.OPRO`'s; the former names ``proposals_per_step``
    and ``style`` are accepted with a `DeprecationWarning`.

    Args:
        problem: The objective, its meta-prompt and its parser.
        prompt_model: The model that proposes solutions: a ``dspy.LM`` or a litellm model string.
            Defaults to ``dspy.settings.lm``. Its ``num_retries`` (DSPy's default: 3) says how often OPRO
            retries a transient failure.
        num_steps: Most optimization steps.
        candidates_per_step: New valid solutions wanted per step (the paper: 8), each from an
            independent sample.
        max_samples_per_step: Most replies sampled in one step. Defaults to
            ``candidates_per_step``: one round, invalid replies are not replaced (the paper's
            linear regression). A larger value re-samples for invalid and duplicate replies up to
            this cap (the paper's TSP asks until it has 8 valid tours, with no cap).
        temperature: Sampling temperature (the paper: 1.0).
        max_shown: How many of the best solutions the meta-prompt shows; the problem's
            ``default_max_shown`` by default (the paper: 20 for regression, 10 for TSP).
        meta_prompt: ``"chat"`` (instruction-tuned models), ``"base"`` (pretrained or tiny models,
            as a plain text completion), or ``"auto"``: `dspy_opro.families.meta_prompt_family`'s
            choice, ``"base"`` for the embedded local models and text-completion LMs
            (``model_type="text"``, e.g. `dspy_opro.local.text_lm`), ``"chat"`` otherwise. A model
            string for ``"base"`` becomes a text-completion LM.
        stop_at_optimum: Stop after the step in which a proposal reaches ``problem.optimum``.
        max_calls: Cap on the samples asked for over the whole run (resumed runs included); the retries of
            a failed request count too, so a round may pass it by those.
        seed: Seeds the samples' rollout ids; with DSPy's cache on, a rerun repeats the run.
        num_threads: Threads for sampling. Defaults to ``dspy.settings.num_threads``.
        log_dir: Directory for the JSON history, replaced atomically after every step, and the call
            ledger. A call with the same problem, model and settings resumes from it.
        show_progress: Show a progress bar over steps.

    Returns:
        The best solution, the per-step trajectory and every proposal with its fate.

    Raises:
        PromptModelError: The prompt model failed in a way retrying cannot fix, or every call of a round
            failed; everything that succeeded is saved in ``log_dir``.
    """
    given = take_renamed(renamed, RENAMED, candidates_per_step=candidates_per_step, meta_prompt=meta_prompt)
    if renamed:
        raise TypeError(f"optimize() got an unexpected keyword argument {next(iter(renamed))!r}")
    candidates_per_step, meta_prompt = given["candidates_per_step"], given["meta_prompt"]
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a dspy_opro.numeric.Problem, got {type(problem).__name__}")
    check_int("num_steps", num_steps, minimum=0)
    check_int(given.name("candidates_per_step"), candidates_per_step, minimum=1)
    if max_samples_per_step is None:
        max_samples_per_step = candidates_per_step
    check_int("max_samples_per_step", max_samples_per_step, minimum=candidates_per_step)
    for name, value in (("max_shown", max_shown), ("max_calls", max_calls), ("num_threads", num_threads)):
        if value is not None:
            check_int(name, value, minimum=1)
    check_int("seed", seed, minimum=-(2**63))
    temperature = check_temperature(temperature)
    check_family(meta_prompt, problem.families, argument=given.name("meta_prompt"), auto=True)
    if isinstance(prompt_model, str):  # built for its family: the embedded models get a text-completion LM
        lm, meta_prompt = optimizer_model(prompt_model, family=meta_prompt, max_tokens=None)
    else:
        lm = resolve_lm(prompt_model, role="prompt_model") or dspy.settings.lm
    if lm is None:
        raise ValueError("no prompt model: pass prompt_model=... (a dspy.LM or a litellm model string)")

    settings = _Settings(
        meta_prompt=resolve_family(meta_prompt, lm, problem.families, argument=given.name("meta_prompt")),
        candidates_per_step=candidates_per_step,
        max_samples_per_step=max_samples_per_step,
        temperature=temperature,
        max_shown=problem.default_max_shown if max_shown is None else max_shown,
        stop_at_optimum=stop_at_optimum,
        max_calls=max_calls,
        seed=seed,
        num_threads=num_threads or dspy.settings.num_threads or 1,
    )
    return NumericRun(problem, lm, settings, log_dir=log_dir).execute(num_steps, show_progress=show_progress)


@dataclass(frozen=True)
class _Settings:
    meta_prompt: str
    candidates_per_step: int
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


class NumericRun:
    """One call of `optimize`: its settings, its state and the run kit around it."""

    def __init__(self, problem: Problem, lm: dspy.BaseLM, settings: _Settings, *, log_dir: str | os.PathLike | None):
        self.problem = problem
        self.lm = lm
        self.calls = without_retries(lm)  # OPRO retries transient failures itself (dspy_opro.calls)
        self.settings = settings
        self.family = problem.family(settings.meta_prompt)
        parts = {
            "problem": problem.fingerprint(),
            "settings": {**settings.shaping_the_samples(), "prompt_model": lm_name(lm)},
        }
        self.kit: RunKit[_State] = RunKit(
            log_dir,
            history_name=CHECKPOINT_NAME,
            ledger_name=LEDGER_NAME,
            version=FORMAT_VERSION,
            prints=fingerprint(parts),
            start=lambda prints: _State(fingerprint=prints),
            load=lambda data: _State.from_json(data, problem),
            dump=lambda state: state.to_json(problem),
            counts=lambda state: state.counts,
            what="a numeric OPRO run",
        )
        self.state = self.kit.state
        self.counts = self.state.counts
        if self.kit.resumed:
            logger.info("Resuming %s from %s after step %d", problem.name, self.kit.path, len(self.state.steps))
        self.counter = self.kit.counter("prompt")
        self.seen: dict[Hashable, float] = {
            p.solution: p.value
            for p in [*self.state.proposals, *(self.state.pending.proposals if self.state.pending else [])]
            if p.evaluated and p.value is not None
        }

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
        self.kit.save()

    def _read(self, step: int, sample: int, reply: str) -> Proposal:
        """A reply as a proposal: valid (evaluated), a duplicate, or invalid with its reason."""
        self.counts.samples += 1
        text = reply[:MAX_REPLY_CHARS]
        try:
            solution = self.family.read(reply)
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

    def _keep(self, pending: _Pending, outcomes: Sequence[Outcome | None]) -> list[Proposal]:
        """A round's outcomes as history entries, in sample order: each failed request, then the reply read."""
        batch = []
        for outcome in outcomes:
            if outcome is None:  # not asked: a stop came first
                continue
            for error in outcome.failures:
                self.counts.samples += 1
                self.counts.errors += 1
                reason = describe(error)[:MAX_REPLY_CHARS]
                batch.append(Proposal(pending.step, len(pending.proposals) + len(batch), "error", reason=reason))
            if outcome.ok:
                batch.append(self._read(pending.step, len(pending.proposals) + len(batch), outcome.value))
        pending.proposals += batch
        return batch

    def _optimum_step(self) -> int | None:
        for proposal in self.state.proposals:
            if proposal.evaluated and self.problem.is_optimal(proposal.value):
                return proposal.step
        return None

    def _calls_left(self) -> float:
        return math.inf if self.settings.max_calls is None else self.settings.max_calls - self.counts.samples

    # ------------------------------------------------------------------ the loop
    def _step(self, step: int) -> NumericStep:
        pending = self.state.pending if self.state.pending is not None and self.state.pending.step == step else None
        if pending is None:
            prompt = render_meta_prompt(
                self.problem, self._history(), self.settings.meta_prompt, max_shown=self.settings.max_shown
            )
            logger.debug("Meta-prompt at step %d:\n%s", step, prompt)
            pending = self.state.pending = _Pending(step, prompt)
        settings = self.settings
        while True:
            new = pending.proposals
            replies = sum(p.status != "error" for p in new)
            valid = sum(p.status == "valid" for p in new)
            wanted = min(
                settings.candidates_per_step - valid, settings.max_samples_per_step - replies, self._calls_left()
            )
            if wanted <= 0:
                break
            try:
                outcomes = ask(
                    self.calls,
                    pending.meta_prompt,
                    range(int(wanted)),
                    temperature=settings.temperature,
                    key=(settings.seed, step, pending.rounds),
                    retries=retries_of(self.lm),
                    model=lm_name(self.lm),
                    step=step,
                    total=int(wanted),
                    counter=self.counter,
                    stop=list(self.family.stop) or None,
                    num_threads=settings.num_threads,
                )
            except PromptModelError as stop:
                self._keep(pending, stop.partial)
                self.kit.stopped(stop)
                raise
            batch = self._keep(pending, outcomes)
            pending.rounds += 1
            if settings.stop_at_optimum and any(
                p.status == "valid" and self.problem.is_optimal(p.value) for p in batch
            ):
                break
        self.state.proposals += pending.proposals
        self.state.pending = None
        best = self._best()
        new = pending.proposals
        record = NumericStep(
            step=step,
            samples=len(new),
            valid=sum(p.status == "valid" for p in new),
            duplicates=sum(p.status == "duplicate" for p in new),
            invalid=sum(p.status == "invalid" for p in new),
            errors=sum(p.status == "error" for p in new),
            best_value=best.value,
            meta_prompt=pending.meta_prompt,
        )
        self.state.steps.append(record)
        self.kit.save()
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
        try:
            if not self.state.proposals:
                self._start()
            self._log_plan(num_steps)
            first = len(self.state.steps) + 1
            stop_reason = "optimum" if self.settings.stop_at_optimum and self._optimum_step() is not None else None
            with Progress(
                total=num_steps,
                done=first - 1,
                desc=f"OPRO {self.problem.name}",
                show=show_progress,
                best=f"{self._best().value:.6g}",
            ) as progress:
                for step in range(first, num_steps + 1):
                    if stop_reason is not None:
                        break
                    if self._calls_left() <= 0 and self.state.pending is None:
                        stop_reason = "max_calls"
                        logger.info("max_calls=%d reached before step %d; stopping", self.settings.max_calls, step)
                        break
                    record = self._step(step)
                    progress.advance(f"{record.best_value:.6g}")
                    if self.settings.stop_at_optimum and self._optimum_step() is not None:
                        stop_reason = "optimum"
            self.state.stop_reason = stop_reason or "num_steps"
            self.kit.save()
        finally:
            self.kit.close()
        return self._result()

    def _log_plan(self, num_steps: int) -> None:
        optimum = self.problem.optimum
        logger.info(
            "OPRO on %s: %d starting solution(s), best %.6g; up to %d steps of %d proposal(s) (at most %d samples "
            "per step), %s meta-prompt showing %d, known optimum %s",
            self.problem.name,
            sum(p.status == "initial" for p in self.state.proposals),
            self._best().value,
            num_steps,
            self.settings.candidates_per_step,
            self.settings.max_samples_per_step,
            self.settings.meta_prompt,
            self.settings.max_shown,
            "unknown" if optimum is None else f"{optimum:.6g}",
        )

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
