"""What ``compile`` returns: the program with the chosen instructions, and the run's records on it.

With ``track_stats`` the program carries ``candidate_programs`` (dicts, best first, each with its own
``program`` as COPRO's and MIPROv2's have), ``trial_logs`` (per step), ``trajectory`` (best score and
candidate scores per step), ``call_counts``, ``total_calls`` (the metric calls) and ``score``. Every
score is on the run's one scale, 0-100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dspy

from .history import Candidate, RunState


def with_instructions(student: dspy.Module, instructions: Mapping[str, str]) -> dspy.Module:
    """A copy of ``student`` whose predictors carry ``instructions``."""
    program = student.deepcopy()
    for name, predictor in program.named_predictors():
        predictor.signature = predictor.signature.with_instructions(instructions[name])
    return program


def result_program(
    student: dspy.Module,
    state: RunState,
    chosen: Candidate,
    *,
    track_stats: bool,
    preflight: Mapping[str, Any],
) -> dspy.Module:
    """The program for ``chosen``, with the run's records attached when ``track_stats``."""
    program = with_instructions(student, chosen.instructions)
    if not track_stats:
        return program
    others = sorted(
        (c for c in state.candidates if c.id != chosen.id),
        key=lambda c: (c.val_score if c.val_score is not None else -1.0, c.score),
        reverse=True,
    )
    # Each entry also carries its program, as COPRO's and MIPROv2's do (a list of dicts, so the programs
    # never become predictors of the returned program).
    program.candidate_programs = [
        {**c.summary(), "program": with_instructions(student, c.instructions)} for c in [chosen, *others]
    ]
    program.trial_logs = [state.step_log(s) for s in state.steps]
    program.trajectory = [
        {
            "step": s.step,
            "predictor": s.predictor,
            "best_score": state.candidates[s.best_id].score,
            "candidate_scores": [state.candidates[i].score for i in s.new_candidates],
        }
        for s in state.steps
    ]
    program.call_counts = {**state.counts.as_dict(), "preflight": dict(preflight)}
    program.total_calls = state.counts.metric_calls  # COPRO's and MIPROv2's name for the metric calls spent
    program.score = chosen.val_score if chosen.val_score is not None else chosen.score
    return program
