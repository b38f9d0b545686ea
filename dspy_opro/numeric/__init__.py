"""OPRO on black-box numeric objectives: the paper's linear regression and traveling salesman tasks.

from dspy_opro.numeric import LinearRegression, optimize
result = optimize(LinearRegression(w_true=15, b_true=14, seed=1), prompt_model="openai/gpt-4o-mini", num_steps=50)

A `Problem` supplies the starting solutions, the objective, the meta-prompt wording and the
parser of proposals; `optimize` runs the loop shared by all problems (ranking, sampling,
validity and de-duplication, caps on attempts, stopping at a known optimum, JSON history).
"""

from .linear_regression import LinearRegression, best_integer_pair, least_squares
from .loop import (
    NumericCounts,
    OptimizationResult,
    Proposal,
    StepRecord,
    load_history,
    make_prompt_model,
    optimize,
)
from .problem import STYLES, InvalidProposal, Problem, Scored, choose_shown, render_meta_prompt
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
    "STYLES",
    "InvalidProposal",
    "LinearRegression",
    "NumericCounts",
    "OptimizationResult",
    "Problem",
    "Proposal",
    "Scored",
    "StepRecord",
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
