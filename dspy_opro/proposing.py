"""Proposing new instructions for one predictor: the meta-prompt, the prompt model's replies, the proposals.

A step works on one predictor. `Proposer.meta_prompt` writes its meta-prompt in the run's family
(`dspy_opro.meta_prompt.FAMILIES`): the predictor's best scored instructions so far (worst first, best
last) and a few training examples as that predictor sees them (`dspy_opro.exemplars`).
`Proposer.sample` asks the prompt model for the step's samples (`dspy_opro.sampling.ask`: retried,
counted, and a stop with `PromptModelError` when the model cannot answer), and `Proposer.read` turns
the replies into new instructions: read by the family, normalised, filtered and de-duplicated
(`dspy_opro.candidates`), with every discarded reply counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from .calls import PromptModelError, retries_of, without_retries
from .candidates import dedup_key, normalize_instruction, rejection_reason
from .counting import CallCounter
from .exemplars import select_exemplars
from .families import Scored, choose_shown
from .history import ALL_PREDICTORS, Candidate, Counts, PendingStep, RunState
from .inputs import describe_task
from .meta_prompt import Exemplar, get_family
from .models import lm_name
from .sampling import ask
from .screening import minibatch, shown_score

logger = logging.getLogger(__name__)


class Proposer:
    """Writes meta-prompts, asks the prompt model and reads its replies, for the steps of one run.

    Args:
        settings: The run's settings (an `dspy_opro.OPRO` with its family resolved).
        predictors: The program's predictors by name.
        trainset: The training examples.
        state: The run's state (its candidates and the best candidate's traces).
        counts: Where proposals and discarded replies are counted.
        prompt_lm: The prompt model.
        counter: Counts the prompt model's calls.
        num_threads: Samples in flight at once.
    """

    def __init__(
        self,
        settings: Any,
        *,
        predictors: Mapping[str, Any],
        trainset: Sequence[dspy.Example],
        state: RunState,
        counts: Counts,
        prompt_lm: dspy.BaseLM,
        counter: CallCounter,
        num_threads: int,
    ):
        self.settings = settings
        self.family = get_family(settings.meta_prompt)
        self.predictors = predictors
        self.names = list(predictors)
        self.trainset = trainset
        self.state = state
        self.counts = counts
        self.prompt_lm = prompt_lm
        self.calls = without_retries(prompt_lm)  # OPRO retries transient failures itself (dspy_opro.calls)
        self.counter = counter
        self.num_threads = num_threads
        self.minibatch = minibatch(len(trainset), settings.seed) if settings.screening == "minibatch" else None

    def history_of(self, name: str, *, all_of_them: bool = False) -> list[Candidate]:
        """The candidates of predictor ``name``; by default only those the meta-prompt may show.

        Those are the complete candidates, and of them, unless ``show_estimates``, only those scored on the
        whole training set: a candidate that screening stopped after a minibatch has only an estimate, often
        far off (two proposals that both score 50 can show as 63 and 38), and out of order with the rest.
        In the minibatch schedule every candidate is shown with its score on the same minibatch (`score_of`).
        """
        n = len(self.trainset)

        def shown(c: Candidate) -> bool:
            if self.minibatch is not None:
                return c.complete and shown_score(c.per_example, self.minibatch) is not None
            return c.complete and (self.settings.show_estimates or c.evaluated == n)

        return [c for c in self.state.candidates if c.predictor in (name, ALL_PREDICTORS) and (all_of_them or shown(c))]

    def score_of(self, candidate: Candidate) -> float:
        """The score the meta-prompt shows: on the run's minibatch in the minibatch schedule, else the training score."""
        if self.minibatch is not None:
            return shown_score(candidate.per_example, self.minibatch)
        return candidate.score

    def _wrong_of_best(self) -> list[int]:
        """The training examples the current best program answers wrongly."""
        best = self.state.best
        return [] if best is None else [j for j, s in enumerate(best.per_example) if s is not None and s < 1.0]

    def _shown(self, history: list[Candidate], name: str) -> list[Candidate]:
        by_id = {c.id: c for c in history}
        scored = [Scored(c.id, self.score_of(c), c.step) for c in history]
        ranked = choose_shown(scored, max_shown=self.settings.max_shown)
        return [by_id[s.solution] for s in ranked]

    def _exemplars(self, step: int, index: int, history: list[Candidate], wrong_best: list[int]) -> list[int]:
        def wrong(candidates):
            counter: Counter = Counter()
            for candidate in candidates:
                counter.update(j for j, s in enumerate(candidate.per_example) if s is not None and s < 1.0)
            return counter

        return select_exemplars(
            self.settings.exemplar_selection,
            n_examples=len(self.trainset),
            k=self.settings.num_exemplars,
            seed=self.settings.seed,
            step=step,
            wrong_ever=wrong(history),
            wrong_current=wrong(self._shown(history, self.names[index])),
            wrong_best=wrong_best,
            salt=str(index) if len(self.names) > 1 else "",
        )

    def _exemplar(self, j: int, name: str, wrong: list[int]) -> Exemplar:
        example = self.trainset[j]
        traced = self.state.best_traces[j].get(name) if j < len(self.state.best_traces) else None
        inputs = traced or {k: str(v) for k, v in example.inputs().items()}
        answer = {k: str(v) for k, v in example.labels().items()}
        if not (self.settings.feedback and j in wrong and j < len(self.state.best_notes)):
            return Exemplar(inputs=inputs, answer=answer)
        note = self.state.best_notes[j] or {}
        # Only the fields the labels name: the rest (a reasoning field) would crowd the meta-prompt.
        output = {k: v for k, v in note.get("output", {}).items() if k in answer} or note.get("output") or {}
        return Exemplar(inputs=inputs, answer=answer, output=output, feedback=note.get("feedback"))

    def meta_prompt(self, step: int, index: int) -> tuple[str, list[int]]:
        """The meta-prompt of ``step`` for predictor ``index``, and the exemplar indices it shows."""
        name = self.names[index]
        history = self.history_of(name)
        wrong = self._wrong_of_best()
        chosen = self._exemplars(step, index, history, wrong)
        shown = [Scored(c.instructions[name], self.score_of(c), c.step) for c in self._shown(history, name)]
        text = self.family.write(
            shown,
            exemplars=[self._exemplar(j, name, wrong) for j in chosen],
            task_description=self.settings.task_description or describe_task(self.predictors[name]),
        )
        return text, chosen

    def sample(self, pending: PendingStep, index: int) -> None:
        """Fill in the step's missing replies, round after round while some calls succeed.

        Raises:
            PromptModelError: At a failure retrying cannot fix, or when a whole round failed; the replies
                that came are in ``pending`` (the caller saves it).
        """
        key = (self.settings.seed, pending.step, index)
        while True:
            missing = [i for i, reply in enumerate(pending.replies) if reply is None]
            if not missing:
                return
            try:
                outcomes = ask(
                    self.calls,
                    pending.meta_prompt,
                    missing,
                    temperature=self.settings.temperature,
                    key=key,
                    retries=retries_of(self.prompt_lm),
                    model=lm_name(self.prompt_lm),
                    step=pending.step,
                    total=len(pending.replies),
                    counter=self.counter,
                    stop=list(self.family.stop) or None,
                    num_threads=self.num_threads,
                )
            except PromptModelError as stop:
                self._keep(pending, missing, stop.partial)
                raise
            self._keep(pending, missing, outcomes)

    @staticmethod
    def _keep(pending: PendingStep, missing: list[int], outcomes: list) -> None:
        for i, outcome in zip(missing, outcomes, strict=True):
            if outcome is not None and outcome.ok:
                pending.replies[i] = outcome.value

    def read(self, step: int, index: int, replies: Sequence[str]) -> list[str]:
        """The new instructions in ``replies``: read, normalised, filtered, never one already in the history."""
        name = self.names[index]
        seen = {dedup_key(c.instructions[name]) for c in self.history_of(name, all_of_them=True)}
        accepted = []
        for reply in replies:
            self.counts.proposals += 1
            extracted = self.family.read(reply)
            if extracted is None:
                self.counts.unparsed += 1
                logger.debug("No instruction found in reply at step %d: %r", step, reply[:200])
                continue
            text = normalize_instruction(extracted)
            reason = rejection_reason(
                text, max_length=self.settings.max_instruction_length, extra_filter=self.settings.instruction_filter
            )
            if reason is not None:
                self.counts.rejected[reason] = self.counts.rejected.get(reason, 0) + 1
                continue
            key = dedup_key(text)
            if key in seen:
                self.counts.duplicates += 1
                continue
            seen.add(key)
            accepted.append(text)
        return accepted
