"""OPRO on black-box numeric objectives: the paper's linear regression and traveling salesman tasks.

from dspy_opro.numeric import LinearRegression, optimize
result = optimize(LinearRegression(w_true=15, b_true=14, seed=1), prompt_model="openai/gpt-4o-mini", num_steps=50)

A `Problem` supplies the starting solutions, the objective, and per meta-prompt family its wording and
the parser of proposals; `optimize` runs the loop shared by all problems (ranking, sampling with OPRO's
call policy, validity and de-duplication, caps on attempts, stopping at a known optimum, a resumable
JSON history), on the same run kit as instruction OPRO (`dspy_opro.run`).
"""

from typing import Any

from dspy_opro.run import former_name

from .history import NumericCounts, NumericStep, OptimizationResult, Proposal, load_history
from .linear_regression import LinearRegression, best_integer_pair, least_squares
from .loop import make_prompt_model, optimize
from .problem import FAMILY_NAMES, InvalidProposal, Problem, Scored, choose_shown, render_meta_prompt
from .tsp import (
    TravelingSalesman,
    farthest_insertion,
    held_karp,
    nearest_neighbour,
    optimality_gap,
    random_points,
    tour_length,
)

__all__ = [
    "FAMILY_NAMES",
    "InvalidProposal",
    "LinearRegression",
    "NumericCounts",
    "NumericStep",
    "OptimizationResult",
    "Problem",
    "Proposal",
    "Scored",
    "TravelingSalesman",
    "best_integer_pair",
    "choose_shown",
    "farthest_insertion",
    "held_karp",
    "least_squares",
    "load_history",
    "make_prompt_model",
    "nearest_neighbour",
    "optimality_gap",
    "optimize",
    "random_points",
    "render_meta_prompt",
    "tour_length",
]


def __getattr__(name: str) -> Any:
    former = {
        "STYLES": ("dspy_opro.numeric.FAMILY_NAMES (or Problem.families)", lambda: FAMILY_NAMES),
        "StepRecord": ("dspy_opro.numeric.NumericStep", lambda: NumericStep),
    }
    return former_name(__name__, name, former)
