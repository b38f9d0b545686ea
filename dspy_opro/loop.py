"""One ``OPRO.compile`` call: the loop that proposes instructions, scores them and keeps the best.

A candidate's path, in the order the code runs: `InstructionRun.execute` scores the initial
instructions, then each step asks the `dspy_opro.proposing.Proposer` for new instructions for one
predictor (a meta-prompt, the prompt model's replies, the proposals read out of them), turns them into
configurations of the whole program (that predictor changed, the others at their best), scores them on
the training set (`dspy_opro.scoring`, with `dspy_opro.screening` by default) and adds them to the
history (`dspy_opro.history.Candidate`). At the end `dspy_opro.selection.choose` picks the result
and `dspy_opro.results.result_program` returns it.

Programs with several predictors are optimized by block coordinate ascent: step ``s`` works on
predictor ``(s - 1) % P``, so one step costs ``candidates_per_step x len(trainset)`` metric calls
whatever the number of predictors, and nothing already scored is ever re-scored. A candidate replaces
the current best program only if it scores strictly higher on the training set.

The run's frame (state file, resume, call ledger and counters, saving before a stop) is
`dspy_opro.run.RunKit`; every step is saved once complete, and a step a stop cut short is kept as
pending and finished on resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dspy

from . import compat, inputs, selection
from .calls import PromptModelError, TaskFailureError, retries_of, without_retries
from .events import report_evaluations
from .history import (
    ALL_PREDICTORS,
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    LEDGER_NAME,
    Candidate,
    PendingStep,
    RunState,
    StepRecord,
)
from .models import lm_name
from .preflight import CheckReport, check_models
from .proposing import Proposer
from .results import result_program, with_instructions
from .run import Progress, RunKit, fingerprint
from .scoring import Evaluation, Scorer
from .screening import affordable, example_order, screen

if TYPE_CHECKING:
    from .optimizer import OPRO

logger = logging.getLogger(__name__)


class RunDeclinedError(RuntimeError):
    """``compile(requires_permission_to_run=True)`` was not confirmed."""


class InstructionRun:
    """One compile call: the loop's state and the parts it uses, kept off the optimizer so it can be reused.

    Args:
        settings: The optimizer with this call's settings (`dspy_opro.OPRO._for_run`).
        student: The program; it is not modified.
        trainset: The training examples.
        valset: The validation examples, or ``None``.
    """

    def __init__(self, settings: OPRO, student: dspy.Module, trainset: list, valset: list | None):
        self.settings = settings
        self.names = inputs.check_student(student)
        inputs.check_examples("trainset", trainset)
        if valset is not None:
            inputs.check_examples("valset", valset)
        inputs.warn_if_tiny(trainset)
        self.student, self.trainset, self.valset = student, trainset, valset
        self.predictors = dict(student.named_predictors())
        self.initial = inputs.initial_instructions(settings.initial_instructions, self.predictors)

        self.task_lm = settings.task_model or dspy.settings.lm
        self.prompt_lm = settings.prompt_model or dspy.settings.lm
        if self.prompt_lm is None:
            raise ValueError(
                "no prompt model: pass OPRO(prompt_model=...) (a dspy.LM or a litellm model string) or "
                "call dspy.configure(lm=...) first"
            )
        if self.task_lm is None and any(getattr(p, "lm", None) is None for p in self.predictors.values()):
            raise ValueError(
                "no task model: pass OPRO(task_model=...) (a dspy.LM or a litellm model string) or "
                "call dspy.configure(lm=...) first"
            )
        self.metric = compat.metric_caller(settings.metric)
        inputs.check_metric(self.metric, trainset[0])

        self.num_threads = settings.num_threads or dspy.settings.num_threads or 1
        self.kit: RunKit[RunState] = RunKit(
            settings.log_dir,
            history_name=CHECKPOINT_NAME,
            ledger_name=LEDGER_NAME,
            version=FORMAT_VERSION,
            prints=self._fingerprint(),
            start=lambda prints: RunState(fingerprint=prints),
            load=RunState.from_json,
            dump=RunState.to_json,
            counts=lambda state: state.counts,
            what="an OPRO run",
            describe={"program": inputs.describe_program},
        )
        self.state = self.kit.state
        self.counts = self.state.counts
        if self.kit.resumed:
            logger.info(
                "Resuming OPRO from %s: %d candidates scored, %d steps done%s",
                self.kit.path,
                len(self.state.candidates),
                self.state.completed_steps,
                f", step {self.state.pending.step} to finish" if self.state.pending is not None else "",
            )
        self.task_counter = self.kit.counter("task")
        self.prompt_counter = self.kit.counter("prompt")
        # OPRO retries transient failures itself, on LM copies making one request per call (dspy_opro.calls).
        max_errors = settings.max_errors if settings.max_errors is not None else dspy.settings.max_errors
        lm_of_task = self.task_lm or next(p.lm for p in self.predictors.values() if p.lm is not None)
        self.scorer = Scorer(
            self.metric,
            task_lm=without_retries(self.task_lm),
            num_threads=self.num_threads,
            max_errors=max_errors,
            counts=self.counts,
            counter=self.task_counter,
            retries=retries_of(lm_of_task),
        )
        self.proposer = Proposer(
            settings,
            predictors=self.predictors,
            trainset=trainset,
            state=self.state,
            counts=self.counts,
            prompt_lm=self.prompt_lm,
            counter=self.prompt_counter,
            num_threads=self.num_threads,
        )
        self.budget_exhausted = False
        self.model_check = CheckReport()

    def _fingerprint(self) -> dict[str, Any]:
        s = self.settings
        settings = {
            "meta_prompt": s.meta_prompt,
            "candidates_per_step": s.candidates_per_step,
            "max_shown": s.max_shown,
            "num_exemplars": s.num_exemplars,
            "exemplar_selection": s.exemplar_selection,
            "temperature": s.temperature,
            "seed": s.seed,
            "initial_instructions": self.initial,
            "max_instruction_length": s.max_instruction_length,
            "task_description": s.task_description,
            "screening": s.screening,
            "show_estimates": s.show_estimates,
            "feedback": s.feedback,
            "prompt_model": lm_name(self.prompt_lm),
            "task_model": lm_name(self.task_lm),
        }
        program = inputs.program_parts(self.predictors)
        parts = {
            "program": program,
            "trainset": inputs.example_parts(self.trainset),
            "valset": inputs.example_parts(self.valset),
            "settings": settings,
        }
        details = {
            "program": program,
            "trainset": inputs.example_digests(self.trainset),
            "valset": inputs.example_digests(self.valset),
            "settings": settings,
        }
        return fingerprint(parts, details)

    # ------------------------------------------------------------ before the run
    def check_models(self) -> None:
        """One cheap request per model before any metric call; a model that cannot work stops here.

        Skipped for a finished run reloaded from ``log_dir``, which calls no model.
        """
        if self.state.selection is not None and self.state.completed_steps >= self.settings.num_steps:
            return
        models = [("prompt_model", self.prompt_lm)]
        if any(getattr(p, "lm", None) is None for p in self.predictors.values()):
            models.append(("task_model", self.task_lm))
        models += [(f"predictor {name!r}", p.lm) for name, p in self.predictors.items() if getattr(p, "lm", None)]
        counters = {role: self.prompt_counter if role == "prompt_model" else self.task_counter for role, _ in models}
        self.model_check = check_models(models, num_threads=self.num_threads, counters=counters)

    def confirm(self) -> None:
        """Show the plan and its cost, and go on only if the user answers "y" on stdin."""
        try:
            answer = input(f"{self.plan_text()}\nStart the run? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise RunDeclinedError(
                "the run was not confirmed, nothing was spent; pass requires_permission_to_run=False (the default) "
                "to run without asking"
            )

    def plan_text(self) -> str:
        """The run's plan and its cost in calls: what ``requires_permission_to_run`` shows and the log states."""
        n_train, s = len(self.trainset), self.settings
        initial = sum(len(v) for v in self.initial.values()) - (len(self.names) - 1)
        per_step = s.candidates_per_step * n_train
        validation = min(self.num_finalists, 1 + s.num_steps * s.candidates_per_step) * len(self.valset or [])
        total = initial * n_train + s.num_steps * per_step + validation
        if s.max_metric_calls:
            total = min(total, s.max_metric_calls)
        models = [self.prompt_lm, self.task_lm, *(getattr(p, "lm", None) for p in self.predictors.values())]
        checks = len({id(lm) for lm in models if lm is not None})
        return (
            f"OPRO plan: {len(self.names)} predictor(s), {n_train} training and {len(self.valset or [])} validation "
            f"examples, {self.num_threads} threads, {s.meta_prompt!r} meta-prompt. Initial instructions: {initial} x "
            f"{n_train} = {initial * n_train} metric calls. Each step: {s.candidates_per_step} prompt-model calls, "
            f"then up to {s.candidates_per_step} new candidates x {n_train} examples = {per_step} metric calls. "
            f"{s.num_steps} steps: at most {total} metric calls in total"
            f"{f' (max_metric_calls={s.max_metric_calls})' if s.max_metric_calls else ''}"
            f"{', usually far fewer: screening stops scoring hopeless candidates early' if s.screening else ''}. "
            f"Cost: at most {s.num_steps * s.candidates_per_step} prompt-model calls and about "
            f"{total * len(self.names)} task-model calls ({len(self.names)} per metric call), plus at most {checks} "
            "set-up check call(s)."
        )

    # ------------------------------------------------------------ the budget
    @property
    def num_finalists(self) -> int:
        return selection.finalist_count(
            self.settings.num_final_candidates, self.settings.max_metric_calls, len(self.valset or [])
        )

    def _validation_reserve(self) -> int:
        return 0 if self.valset is None else self.num_finalists * len(self.valset)

    def _loop_budget(self) -> float:
        """Metric calls still available to the optimization loop."""
        if self.settings.max_metric_calls is None:
            return math.inf
        return self.settings.max_metric_calls - self._validation_reserve() - self.counts.metric_calls

    def _stop_for_budget(self, step: int) -> None:
        self.budget_exhausted = True
        logger.info(
            "Stopping before step %d: max_metric_calls=%d leaves too little for another candidate "
            "(%d metric calls spent, %d kept for validation).",
            step,
            self.settings.max_metric_calls,
            self.counts.metric_calls,
            self._validation_reserve(),
        )

    # ------------------------------------------------------------ the loop
    def execute(self) -> dspy.Module:
        logger.info("%s", self.plan_text())
        progress = None
        try:
            if not self.state.steps:
                self._score_initial()
            first_step = self.state.completed_steps + 1
            progress = Progress(
                total=self.settings.num_steps,
                done=first_step - 1,
                desc="OPRO",
                show=self.settings.show_progress,
                best=f"{self.state.best.score:.1f}",
            )
            for step in range(first_step, self.settings.num_steps + 1):
                started = self._pending(step) is not None  # its budget was settled when it started
                if not started and self._loop_budget() < len(self.trainset):
                    self._stop_for_budget(step)
                    break
                self._step(step)
                progress.advance(f"{self.state.best.score:.1f}")
                if self.budget_exhausted:
                    break
            chosen = selection.choose(self)
            self.kit.save()
        finally:
            if progress is not None:
                progress.close()
            self.kit.close()
        return result_program(
            self.student,
            self.state,
            chosen,
            track_stats=self.settings.track_stats,
            preflight=self.model_check.as_dict(),
        )

    def _pending(self, step: int) -> PendingStep | None:
        """The saved state of ``step`` if a stopped run left it unfinished."""
        pending = self.state.pending
        return pending if pending is not None and pending.step == step else None

    def usable(self, candidate: Candidate) -> bool:
        """Scored on the whole training set with no failure: it may be the best, a finalist, the result."""
        return candidate.complete and candidate.evaluated == len(self.trainset)

    def _add(self, step: int, predictor: str, config: dict[str, str], evaluation: Evaluation) -> Candidate:
        assert not evaluation.failed, "a step ends only when every failed example was run again"
        candidate = Candidate(
            id=len(self.state.candidates),
            step=step,
            predictor=predictor,
            instructions=dict(config),
            per_example=list(evaluation.scores),
            failures=evaluation.failures,
            program_errors=sorted(evaluation.program_errors),
        )
        self.state.candidates.append(candidate)
        best = self.state.best
        if self.usable(candidate) and (best is None or candidate.score > best.score):
            self.state.best_id = candidate.id
            self.state.best_traces = evaluation.traces or []
            self.state.best_notes = evaluation.notes or []
        if candidate.program_errors:
            logger.warning(
                "Candidate %d is left out: the program or the metric raised on %d example(s); first: %s",
                candidate.id,
                len(candidate.program_errors),
                evaluation.first_error,
            )
        return candidate

    def _end_step(self, pending: PendingStep, new: list[Candidate]) -> None:
        """Record a complete step and save it."""
        record = StepRecord(
            pending.step,
            pending.predictor,
            pending.exemplars,
            pending.meta_prompt,
            len(pending.replies),
            [c.id for c in new],
            self.state.best_id,
        )
        self.state.steps.append(record)
        self.state.pending = None
        self.kit.save()

    def _score_initial(self) -> None:
        pending = self._pending(0)
        if pending is None:
            base = {name: texts[0] for name, texts in self.initial.items()}
            configs = [(self.names[0] if len(self.names) == 1 else ALL_PREDICTORS, base)]
            for name, texts in self.initial.items():
                configs += [(name, {**base, name: text}) for text in texts[1:]]
            need = len(configs) * len(self.trainset)
            if self._loop_budget() < need:
                raise ValueError(
                    f"max_metric_calls={self.settings.max_metric_calls} cannot cover scoring the {len(configs)} "
                    f"initial instruction(s) on {len(self.trainset)} examples ({need} calls) plus validation "
                    f"({self._validation_reserve()} calls); raise it or use fewer examples"
                )
            pending = PendingStep(0, "", [], "", configs=configs)
            self.state.pending = pending
        evaluations = self._score_pending(pending, screened=False)
        if not any(e.complete for e in evaluations):
            # Nothing to start from: keep the step pending (a rerun after a fix re-scores what failed).
            pending.evaluations = [e.to_json() for e in evaluations]
            first = next(e.first_error for e in evaluations if e.first_error)
            error = TaskFailureError(
                f"None of the {len(evaluations)} initial instruction(s) could be scored on every training example: "
                f"the program or the metric raised (first: {first}). A failed example is never counted as a "
                "score; make the program and the metric handle every example (return 0 for an answer the metric "
                "cannot read), then run again.",
                kind="program",
                last_error=first,
            )
            self.kit.stopped(error)
            raise error
        for (predictor, config), evaluation in zip(pending.configs, evaluations, strict=True):
            self._add(0, predictor, config, evaluation)
        self._end_step(pending, list(self.state.candidates))
        best = self.state.best
        logger.info("Initial instructions scored; best %.1f: %r", best.score, best.instruction)

    def _step(self, step: int) -> None:
        """Run one step (or finish the one a stopped run left); the step is saved only once it is complete."""
        index = (step - 1) % len(self.names)
        name = self.names[index]
        pending = self._pending(step)
        if pending is None:
            text, chosen = self.proposer.meta_prompt(step, index)
            logger.debug("Meta-prompt at step %d for %s:\n%s", step, name, text)
            pending = PendingStep(step, name, chosen, text, replies=[None] * self.settings.candidates_per_step)
            self.state.pending = pending
        try:
            self.proposer.sample(pending, index)
        except PromptModelError as error:
            self.kit.stopped(error)
            raise
        if pending.configs is None:
            proposals = self.proposer.read(step, index, pending.replies)
            budget = self._loop_budget()
            fit = affordable(len(proposals), len(self.trainset), budget, screened=self.settings.screening)
            if fit < len(proposals):
                proposals = proposals[:fit]
                pending.final = True
                logger.info("max_metric_calls reached: scoring %d candidate(s) at step %d, then stopping", fit, step)
            base = self.state.best.instructions
            pending.configs = [(name, {**base, name: proposal}) for proposal in proposals]
            pending.budget = None if budget == math.inf else int(budget)
        evaluations = self._score_pending(pending, screened=self.settings.screening) if pending.configs else []
        new = [
            self._add(step, name, config, evaluation)
            for (_, config), evaluation in zip(pending.configs, evaluations, strict=True)
        ]
        self.budget_exhausted = self.budget_exhausted or pending.final
        self._end_step(pending, new)
        logger.info(
            "Step %d (%s): %d new candidate(s)%s; best %.1f",
            step,
            name,
            len(new),
            f" scoring {', '.join(f'{c.score:.1f}' for c in new)}" if new else "",
            self.state.best.score,
        )

    # ------------------------------------------------------------ scoring
    def scoring_program(self, instructions: Mapping[str, str]) -> dspy.Module:
        """The program to score: predictors with their own LM get a copy making one request per call."""
        program = with_instructions(self.student, instructions)
        for predictor in program.predictors():
            if predictor.lm is not None:
                predictor.lm = without_retries(predictor.lm)
        return program

    def evaluate(
        self,
        programs: list[dspy.Module],
        examples: Sequence[dspy.Example],
        *,
        screened: bool = False,
        max_calls: int | None = None,
        known: list[Evaluation | None] | None = None,
        validation: bool = False,
    ) -> list[Evaluation]:
        """Score ``programs`` on ``examples`` (screened when asked), then fire DSPy's evaluate callbacks."""
        if screened:
            evaluations = screen(
                self.scorer,
                programs,
                examples,
                threshold=self.state.best.score,
                order=example_order(len(examples), self.settings.seed),
                max_calls=max_calls,
                known=known,
                against=self.state.best.per_example if self.settings.screening == "minibatch" else None,
            )
        else:
            evaluations = self.scorer.evaluate(programs, examples, capture_traces=not validation, known=known)
        report_evaluations(
            programs,
            examples,
            evaluations,
            metric=self.settings.metric,
            num_threads=self.num_threads,
            validation=validation,
        )
        return evaluations

    def _score_pending(self, pending: PendingStep, *, screened: bool) -> list[Evaluation]:
        """Score the step's candidates, starting from what a stopped run measured; on a stop, save and raise."""
        known = None
        if pending.evaluations is not None:
            known = [None if e is None else Evaluation.from_json(e) for e in pending.evaluations]
        programs = [self.scoring_program(config) for _, config in pending.configs]
        try:
            return self.evaluate(programs, self.trainset, screened=screened, max_calls=pending.budget, known=known)
        except TaskFailureError as exc:
            pending.evaluations = [e.to_json() for e in exc.partial]
            self.kit.stopped(exc)
            raise
