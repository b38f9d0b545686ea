"""Linear regression as a black box, the first numeric task of the OPRO paper.

The data: x = 1, 2, ..., 50 and y = w_true * x + b_true + noise, noise drawn from N(0, 1).
The objective: the sum of squared residuals of a line (w, b), which the prompt model only
sees through the values of the pairs it has tried. Solutions are integer pairs; the run
starts from 5 random pairs in [10, 20]^2 and stops when the exact optimum (the best integer
pair, found by search around the closed-form least-squares line) is proposed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .problem import InvalidProposal, Problem, Scored, display_value

logger = logging.getLogger(__name__)

# --- "chat": the paper's wording, for instruction-tuned models -----------------------------------
CHAT_INTRO = (
    "Help me minimize a function of two variables, w and b. Below are (w, b) pairs I have tried, each "
    "with the value of the function there. The pairs are listed from the highest value to the lowest, "
    "and lower values are better."
)
CHAT_ENTRY = "input:\nw={w}, b={b}\nvalue:\n{value}"
CHAT_REQUEST = (
    "Propose a new (w, b) pair that differs from every pair above and has a lower function value than "
    "all of them. Do not write code. End your reply with the pair as [w, b], where w and b are integers."
)

# --- "base": one pair per line and an open line, for pretrained or very small models -------------
BASE_INTRO = (
    "Pairs [w, b] and the value of a function at each pair, from the highest value to the lowest. "
    "Lower values are better; each new pair improves on the one before."
)
BASE_ENTRY = "[{w}, {b}] value {value}"
BASE_OPEN = "["
BASE_STOP = "]"

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(rf"^\s*(?:w\s*[=:]\s*)?({_NUMBER})\s*[,;]\s*(?:b\s*[=:]\s*)?({_NUMBER})\s*$", re.IGNORECASE)
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")

DEFAULT_MAX_ABS = 10_000  # proposals beyond this are rejected as out of range


def _integer(text: str, *, max_abs: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise InvalidProposal("not a number", text) from None
    if not math.isfinite(value) or abs(value) > max_abs:
        raise InvalidProposal("out of range", f"{text} (allowed: |value| <= {max_abs})")
    if value != int(value):
        raise InvalidProposal("non-integer", text)
    return int(value)


def parse_pair(text: str, *, max_abs: int = DEFAULT_MAX_ABS) -> tuple[int, int]:
    """Read ``"w, b"`` (also ``"w=15, b=14"``) as an integer pair.

    Raises:
        InvalidProposal: Not two numbers, not integers (``15.0`` counts as an integer), or
            beyond ``max_abs``.
    """
    match = _PAIR.match(text)
    if not match:
        raise InvalidProposal("not a pair of numbers", text[:80])
    return _integer(match.group(1), max_abs=max_abs), _integer(match.group(2), max_abs=max_abs)


def extract_pair(reply: str, family: str, *, max_abs: int = DEFAULT_MAX_ABS) -> tuple[int, int]:
    """The pair a reply proposes.

    ``"chat"`` replies: the last ``[...]`` holding two numbers (a literal ``[w, b]`` or any
    other bracket is skipped). ``"base"`` replies continue an open ``[``: the text up to the
    first ``]`` or line break.

    Raises:
        InvalidProposal: No pair, or the pair found is not a valid integer pair.
    """
    if family == "base":
        head = reply.split(BASE_STOP, 1)[0].split("\n", 1)[0]
        head = head.rsplit(BASE_OPEN, 1)[-1]  # a model that opened its own bracket
        if not head.strip():
            raise InvalidProposal("no pair found")
        return parse_pair(head, max_abs=max_abs)
    groups = _BRACKETS.findall(reply)
    pairs = [g for g in groups if _PAIR.match(g)]
    if not pairs:
        raise InvalidProposal("no pair found", reply[-80:])
    return parse_pair(pairs[-1], max_abs=max_abs)


def sum_of_squares(x: np.ndarray, y: np.ndarray, w: float, b: float) -> float:
    """The objective: sum of squared residuals of the line y = w x + b."""
    residual = y - (w * x + b)
    return float(residual @ residual)


def least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The closed-form least-squares line (w, b)."""
    x_mean, y_mean = x.mean(), y.mean()
    w = float(((x - x_mean) @ (y - y_mean)) / ((x - x_mean) @ (x - x_mean)))
    return w, float(y_mean - w * x_mean)


def best_integer_pair(x: np.ndarray, y: np.ndarray) -> tuple[tuple[int, int], float]:
    """The integer pair (w, b) with the smallest sum of squares, and that sum. Exact.

    The objective is f* + n (b - b_w)^2 + Sxx (w - w*)^2 for the least-squares slope w*, the
    best intercept b_w for a given w and Sxx = sum (x - mean x)^2. For each integer w the best
    integer b is b_w rounded down or up; w moves outward from w* until Sxx (w - w*)^2 alone
    exceeds the best value found.
    """
    w_star, _ = least_squares(x, y)
    x_mean = x.mean()
    sxx = float((x - x_mean) @ (x - x_mean))
    f_star = sum_of_squares(x, y, *least_squares(x, y))
    best: tuple[tuple[int, int], float] | None = None
    for direction, start in ((1, math.ceil(w_star)), (-1, math.ceil(w_star) - 1)):
        w = start
        while best is None or f_star + sxx * (w - w_star) ** 2 <= best[1]:
            b_w = float((y - w * x).mean())
            for b in {math.floor(b_w), math.ceil(b_w)}:
                value = sum_of_squares(x, y, w, b)
                if best is None or value < best[1] or (value == best[1] and (w, b) < best[0]):
                    best = ((w, b), value)
            w += direction
    assert best is not None
    return best


class LinearRegression(Problem):
    """The paper's linear regression: find the integer line (w, b) that best fits noisy data.

    Args:
        w_true: Slope of the line that generates the data.
        b_true: Intercept of that line.
        num_points: Data points, at x = 1, ..., num_points (the paper: 50).
        noise_std: Standard deviation of the Gaussian noise on y (the paper: 1).
        seed: Seeds the noise and the starting pairs.
        num_starts: Random starting pairs (the paper: 5). The optimum is never among them.
        start_range: Inclusive integer range of both coordinates of the starting pairs
            (the paper: [10, 20]).
        max_abs: Proposals with a coordinate beyond this are rejected as out of range.
    """

    name = "linear_regression"
    minimize = True
    default_max_shown = 20

    def __init__(
        self,
        *,
        w_true: float = 15,
        b_true: float = 14,
        num_points: int = 50,
        noise_std: float = 1.0,
        seed: int = 0,
        num_starts: int = 5,
        start_range: tuple[int, int] = (10, 20),
        max_abs: int = DEFAULT_MAX_ABS,
    ):
        if num_points < 2:
            raise ValueError(f"num_points must be at least 2 to fit a line, got {num_points}")
        if num_starts < 1:
            raise ValueError(f"num_starts must be at least 1, got {num_starts}")
        low, high = start_range
        if low > high or (high - low + 1) ** 2 <= num_starts:
            raise ValueError(f"start_range {start_range} holds too few integer pairs for {num_starts} starts")
        self.w_true, self.b_true = w_true, b_true
        self.noise_std, self.seed, self.max_abs = noise_std, seed, max_abs
        rng = np.random.default_rng(seed)
        self.x = np.arange(1, num_points + 1, dtype=float)
        self.y = w_true * self.x + b_true + noise_std * rng.standard_normal(num_points)
        self.least_squares = least_squares(self.x, self.y)
        self.optimum_solution, self._optimum = best_integer_pair(self.x, self.y)
        starts: list[tuple[int, int]] = []
        while len(starts) < num_starts:
            pair = (int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1)))
            if pair != self.optimum_solution and pair not in starts:
                starts.append(pair)
        self._starts = starts

    @property
    def optimum(self) -> float:
        return self._optimum

    def initial_solutions(self) -> list[tuple[int, int]]:
        return list(self._starts)

    def evaluate(self, solution: tuple[int, int]) -> float:
        w, b = solution
        return sum_of_squares(self.x, self.y, w, b)

    def parse(self, reply: str, family: str) -> tuple[int, int]:
        return extract_pair(reply, family, max_abs=self.max_abs)

    def stop(self, family: str) -> list[str] | None:
        return [BASE_STOP] if family == "base" else None

    def meta_prompt(self, shown: Sequence[Scored], family: str) -> str:
        if family == "base":
            lines = [BASE_INTRO, ""]
            lines += [BASE_ENTRY.format(w=s.solution[0], b=s.solution[1], value=display_value(s.value)) for s in shown]
            lines.append(BASE_OPEN)
            return "\n".join(lines)
        entries = [CHAT_ENTRY.format(w=s.solution[0], b=s.solution[1], value=display_value(s.value)) for s in shown]
        return "\n\n".join([CHAT_INTRO, "\n\n".join(entries), CHAT_REQUEST])

    def describe(self, solution: tuple[int, int]) -> str:
        return f"(w={solution[0]}, b={solution[1]})"

    def fingerprint(self) -> dict[str, Any]:
        return {
            **super().fingerprint(),
            "x": self.x.tolist(),
            "y": [round(v, 12) for v in self.y.tolist()],
            "max_abs": self.max_abs,
        }
