"""Choosing the result of an instruction OPRO run: finalists by training score, then the validation set.

Without a valset the best training score wins. With one, the best ``num_final_candidates`` distinct
configurations by training score (and the best starting one, so that the result never validates worse
than the start) are scored on the valset, and the best validation score wins, ties broken by the
training score (`rank`). `benchmarks/final_choice.py` measures this rule against others (the best
training score, the best score over both sets, the start) on held-out test data. Under ``max_metric_calls``,
validation takes at most a quarter of the budget (`finalist_count`). A validation that a stop cut short
is resumed with the same plan and budget.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .calls import TaskFailureError
from .history import Candidate
from .scoring import Evaluation

if TYPE_CHECKING:
    from .loop import InstructionRun

logger = logging.getLogger(__name__)

VALIDATION_SHARE = 4  # under a budget, validation takes at most 1/VALIDATION_SHARE of it


def finalist_count(num_final_candidates: int, max_metric_calls: int | None, n_val: int) -> int:
    """Candidates validated at the end: ``num_final_candidates``, within a quarter of the budget."""
    if not n_val or max_metric_calls is None:
        return num_final_candidates
    affordable = max_metric_calls // VALIDATION_SHARE // n_val
    return max(1, min(num_final_candidates, affordable))


def choose(run: InstructionRun) -> Candidate:
    """The run's result (see the module docstring); records the choice in the run's state."""
    state, valset = run.state, run.valset
    if valset is None:
        state.selection = {"on": "trainset", "chosen": state.best_id}
        return state.best
    ranked, seen = [], set()
    for candidate in sorted(filter(run.usable, state.candidates), key=lambda c: (-c.score, c.id)):
        key = tuple(sorted(candidate.instructions.items()))
        if key not in seen:
            seen.add(key)
            ranked.append(candidate)
    finalists = ranked[: run.num_finalists]
    # The best starting configuration is always validated when there are two or more places: the result
    # is then never a program that does worse on validation than the one the run started from.
    start = next((c for c in ranked if c.step == 0), None)
    if start is not None and start not in finalists and len(finalists) >= 2:
        finalists = finalists[:-1] + [start]
    ids = [c.id for c in finalists]
    plan = state.selection or {}
    if plan.get("finalists") == ids and "validating" in plan:
        todo = [state.candidates[i] for i in plan["validating"]]  # a stopped validation: same plan, same budget
    else:
        todo = [c for c in finalists if not (c.validation or {}).get("done")]
        limit = run.settings.max_metric_calls
        if limit is not None:
            room = max((limit - run.counts.metric_calls) // len(valset), 0)
            skipped, todo = todo[room:], todo[:room]
            if skipped:
                logger.warning("max_metric_calls leaves no room to validate %d finalist(s)", len(skipped))
        state.selection = {"on": "valset", "finalists": ids, "validating": [c.id for c in todo]}
    if todo:
        _validate(run, todo)
    validated = [c for c in finalists if c.val_score is not None]
    chosen = max(validated, key=rank) if validated else state.best
    state.selection = {"on": "valset", "finalists": ids, "chosen": chosen.id}
    logger.info(
        "Chose candidate %d: train %.1f, validation %s",
        chosen.id,
        chosen.score,
        "n/a" if chosen.val_score is None else f"{chosen.val_score:.1f}",
    )
    return chosen


def rank(candidate: Any) -> tuple:
    """The final choice's sort key over validated candidates (anything with ``val_score``, ``score`` and
    ``id``): the best validation score, then the best training score, then the earlier candidate."""
    return (candidate.val_score, candidate.score, -candidate.id)


def _validate(run: InstructionRun, todo: list[Candidate]) -> None:
    """Score ``todo`` on the valset; a validation score only for those scored on every example."""
    programs = [run.scoring_program(c.instructions) for c in todo]
    known = [None if c.validation is None else Evaluation.from_json(c.validation) for c in todo]
    try:
        evaluations = run.evaluate(programs, run.valset, known=known, validation=True)
    except TaskFailureError as exc:
        for candidate, evaluation in zip(todo, exc.partial, strict=True):
            candidate.validation = evaluation.to_json()
        run.kit.stopped(exc)
        raise
    for candidate, evaluation in zip(todo, evaluations, strict=True):
        candidate.validation = {**evaluation.to_json(), "done": True}
        if not evaluation.complete:
            logger.warning(
                "Finalist %d is left out: the program or the metric raised on %d validation example(s); first: %s",
                candidate.id,
                len(evaluation.program_errors),
                evaluation.first_error,
            )
