"""The traveling salesman problem as a black box, the second numeric task of the OPRO paper.

n points with integer coordinates in [-100, 100]^2; a solution is a tour that starts at point 0
and visits every point exactly once before returning to 0; the objective is its Euclidean
length. The meta-prompt lists the points and the best tours so far, longest first, and asks
for a shorter one. The classical baselines are here too, so results can be put in context:
nearest neighbour, farthest insertion, and the exact optimum by Held-Karp dynamic programming
for small n. The paper is explicit that OPRO does not compete with TSP solvers; it shows that
prompting alone can make progress on an optimization problem.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Sequence
from typing import Any

from .problem import InvalidProposal, Problem, Scored, display_value

logger = logging.getLogger(__name__)

Point = tuple[int, int]
Tour = tuple[int, ...]

MAX_EXACT_NODES = 13  # Held-Karp takes O(n^2 2^n) time and O(n 2^n) memory; 13 points take about a second
COORDINATE_RANGE = (-100, 100)

# --- "chat": the paper's wording, for instruction-tuned models -----------------------------------
CHAT_POINTS = "Here are {n} points and their coordinates:\n{points}."
CHAT_INTRO = (
    "Below are tours through these points, each with its length. The tours are listed from the longest "
    "to the shortest, and shorter tours are better."
)
CHAT_ENTRY = "<trace>{tour}</trace>\nlength:\n{length}"
CHAT_REQUEST = (
    "Write a new tour that differs from every tour above and is shorter than all of them. It must start "
    "at point 0 and visit every point exactly once. Write the point numbers separated by commas, starting "
    "with <trace> and ending with </trace>."
)

# --- "base": one tour per line and an open line, for pretrained or very small models -------------
BASE_POINTS = "Points and their coordinates: {points}."
BASE_INTRO = (
    "Tours that start at point 0 and visit every point exactly once, from the longest to the shortest. "
    "Each new tour is shorter than the one before."
)
BASE_ENTRY = "<trace>{tour}</trace> length {length}"
BASE_OPEN = "<trace>"
BASE_STOP = "</trace>"

_TRACE = re.compile(r"<trace>(.*?)</trace>", re.IGNORECASE | re.DOTALL)
_OPEN = re.compile(r"<trace>", re.IGNORECASE)
_CLOSE = re.compile(r"</trace>", re.IGNORECASE)
_SEPARATORS = re.compile(r"[\s,;]+")


# ------------------------------------------------------------------------------------------------
# Points, tours and their lengths


def random_points(
    n: int, *, seed: int = 0, low: int = COORDINATE_RANGE[0], high: int = COORDINATE_RANGE[1]
) -> list[Point]:
    """``n`` distinct random points with integer coordinates in ``[low, high]^2``."""
    if n > (high - low + 1) ** 2:
        raise ValueError(f"cannot place {n} distinct points on a {high - low + 1}-wide grid")
    rng = random.Random(seed)
    points: list[Point] = []
    while len(points) < n:
        point = (rng.randint(low, high), rng.randint(low, high))
        if point not in points:
            points.append(point)
    return points


def distance_matrix(points: Sequence[Point]) -> list[list[float]]:
    """Euclidean distances between every pair of points."""
    return [[math.dist(p, q) for q in points] for p in points]


def tour_length(points: Sequence[Point], tour: Sequence[int]) -> float:
    """Length of the closed tour (back to its first point at the end)."""
    return sum(math.dist(points[tour[i - 1]], points[tour[i]]) for i in range(len(tour)))


def optimality_gap(length: float, optimum: float) -> float:
    """How much longer ``length`` is than ``optimum``, in percent."""
    return 100.0 * (length - optimum) / optimum


def check_tour(tour: Sequence[int], n: int) -> Tour:
    """``tour`` as a tuple if it starts at 0 and visits each of the ``n`` points exactly once.

    A closing return to 0 at the end (``0,2,1,3,0``) is accepted and dropped.

    Raises:
        InvalidProposal: ``"wrong start"``, ``"unknown point"``, ``"repeated point"`` or
            ``"missing points"``.
    """
    tour = list(tour)
    if len(tour) == n + 1 and tour[0] == tour[-1] == 0:
        tour = tour[:-1]
    if not tour or tour[0] != 0:
        raise InvalidProposal("wrong start", f"a tour starts at point 0, got {tour[:1]}")
    unknown = sorted({p for p in tour if not 0 <= p < n})
    if unknown:
        raise InvalidProposal("unknown point", f"{unknown[:5]} (points are 0..{n - 1})")
    if len(set(tour)) != len(tour):
        repeated = sorted({p for p in tour if tour.count(p) > 1})
        raise InvalidProposal("repeated point", str(repeated[:5]))
    if len(tour) != n:
        missing = sorted(set(range(n)) - set(tour))
        raise InvalidProposal("missing points", f"{len(missing)} missing, e.g. {missing[:5]}")
    return tuple(tour)


def parse_tour(text: str, n: int) -> Tour:
    """Read comma-separated point numbers as a valid tour of ``n`` points (see `check_tour`).

    Raises:
        InvalidProposal: ``"empty tour"``, ``"not integers"``, or a reason from `check_tour`.
    """
    items = [item for item in _SEPARATORS.split(text.strip()) if item]
    if not items:
        raise InvalidProposal("empty tour")
    try:
        numbers = [int(item) for item in items]
    except ValueError:
        raise InvalidProposal("not integers", text[:80]) from None
    return check_tour(numbers, n)


def extract_tour(reply: str, family: str, n: int) -> Tour:
    """The tour a reply proposes.

    ``"chat"`` replies: the last complete ``<trace>...</trace>``. ``"base"`` replies continue an
    open ``<trace>``: the text up to the first ``</trace>`` (the stop string, should the model
    write it anyway) or the end of the line.

    Raises:
        InvalidProposal: ``"no tour found"`` or a reason from `parse_tour`.
    """
    if family == "base":
        head = _CLOSE.split(reply, maxsplit=1)[0].split("\n", 1)[0]
        head = _OPEN.split(head)[-1]  # a model that opened its own tag
        if not head.strip():
            raise InvalidProposal("no tour found")
        return parse_tour(head, n)
    found = _TRACE.findall(reply)
    if not found:
        raise InvalidProposal("no tour found", reply[-80:])
    return parse_tour(found[-1], n)


# ------------------------------------------------------------------------------------------------
# Classical baselines


def nearest_neighbour(points: Sequence[Point]) -> Tour:
    """Start at 0 and always go to the closest unvisited point (ties: the lowest number)."""
    dist = distance_matrix(points)
    tour, left = [0], set(range(1, len(points)))
    while left:
        here = tour[-1]
        nxt = min(left, key=lambda p: (dist[here][p], p))
        tour.append(nxt)
        left.remove(nxt)
    return tuple(tour)


def farthest_insertion(points: Sequence[Point]) -> Tour:
    """Farthest insertion: start from point 0; repeatedly take the unvisited point farthest from
    the tour (largest distance to its nearest tour point) and insert it where it lengthens the
    tour least. Ties go to the lowest point number and the earliest position."""
    n = len(points)
    dist = distance_matrix(points)
    tour = [0]
    nearest = {p: dist[0][p] for p in range(1, n)}  # distance from each unvisited point to the tour
    while nearest:
        pick = max(nearest, key=lambda p: (nearest[p], -p))
        del nearest[pick]
        if len(tour) == 1:
            tour.append(pick)
        else:
            costs = [
                dist[tour[i]][pick] + dist[pick][tour[(i + 1) % len(tour)]] - dist[tour[i]][tour[(i + 1) % len(tour)]]
                for i in range(len(tour))
            ]
            position = min(range(len(tour)), key=lambda i: (costs[i], i))
            tour.insert(position + 1, pick)
        for p in nearest:
            nearest[p] = min(nearest[p], dist[pick][p])
    return tuple(tour)


def held_karp(points: Sequence[Point], *, max_nodes: int = MAX_EXACT_NODES) -> tuple[Tour, float]:
    """The shortest tour starting at 0, by Held-Karp dynamic programming, and its length.

    ``cost[mask][j]``: the shortest path that starts at 0, visits exactly the points in ``mask``
    (a bit set over points 1..n-1) and ends at ``j``.

    Raises:
        ValueError: More than ``max_nodes`` points (time and memory grow as 2^n).
    """
    n = len(points)
    if n > max_nodes:
        raise ValueError(
            f"the exact optimum by dynamic programming is limited to {max_nodes} points (it costs O(n^2 2^n)); "
            f"got {n}. Use fewer points, or compare with the heuristics only."
        )
    if n < 2:
        return tuple(range(n)), 0.0
    dist = distance_matrix(points)
    m = n - 1  # points 1..n-1 are bits 0..m-1
    full = (1 << m) - 1
    cost = [[math.inf] * n for _ in range(1 << m)]
    parent = [[-1] * n for _ in range(1 << m)]
    for j in range(1, n):
        cost[1 << (j - 1)][j] = dist[0][j]
    for mask in range(1, full + 1):
        row = cost[mask]
        for j in range(1, n):
            here = row[j]
            if here == math.inf:
                continue
            for k in range(1, n):
                bit = 1 << (k - 1)
                if mask & bit:
                    continue
                candidate = here + dist[j][k]
                if candidate < cost[mask | bit][k]:
                    cost[mask | bit][k] = candidate
                    parent[mask | bit][k] = j
    last = min(range(1, n), key=lambda j: (cost[full][j] + dist[j][0], j))
    length = cost[full][last] + dist[last][0]
    tour, mask, j = [], full, last
    while j > 0:
        tour.append(j)
        j, mask = parent[mask][j], mask & ~(1 << (j - 1))
    return (0, *reversed(tour)), length


# ------------------------------------------------------------------------------------------------
# The problem


class TravelingSalesman(Problem):
    """The paper's TSP: find a short tour through random integer points, starting at point 0.

    Args:
        points: The points; ``n`` random ones (see `random_points`) when not given.
        n: Number of random points when ``points`` is not given.
        seed: Seeds the random points and the starting tours.
        num_starts: Random starting tours (the paper: 5); never optimal when the optimum is known.
        exact: Compute the exact optimum by `held_karp` (needed to stop at the optimum). ``None``:
            when ``n <= max_exact_nodes``.
        max_exact_nodes: Largest n for the exact optimum.
    """

    name = "tsp"
    minimize = True
    default_max_shown = 10

    def __init__(
        self,
        points: Sequence[Point] | None = None,
        *,
        n: int = 10,
        seed: int = 0,
        num_starts: int = 5,
        exact: bool | None = None,
        max_exact_nodes: int = MAX_EXACT_NODES,
    ):
        self.points: list[Point] = (
            [(int(x), int(y)) for x, y in points] if points is not None else random_points(n, seed=seed)
        )
        self.n = len(self.points)
        if self.n < 4:
            raise ValueError(f"a TSP needs at least 4 points to have tours of different lengths, got {self.n}")
        if num_starts < 1:
            raise ValueError(f"num_starts must be at least 1, got {num_starts}")
        self.seed = seed
        if exact is None:
            exact = self.n <= max_exact_nodes
        self.exact_tour: Tour | None = None
        self._optimum: float | None = None
        if exact:
            self.exact_tour, self._optimum = held_karp(self.points, max_nodes=max_exact_nodes)
        self._starts = self._random_tours(num_starts)

    def _random_tours(self, count: int) -> list[Tour]:
        rng = random.Random(f"tsp-starts/{self.seed}")
        tours: list[Tour] = []
        for _ in range(1000 * count):  # few points have few distinct tours; never loop forever
            if len(tours) == count:
                break
            rest = list(range(1, self.n))
            rng.shuffle(rest)
            tour = (0, *rest)
            if tour in tours or self.is_optimal(tour_length(self.points, tour)):
                continue
            tours.append(tour)
        return tours

    @property
    def optimum(self) -> float | None:
        return self._optimum

    def initial_solutions(self) -> list[Tour]:
        return list(self._starts)

    def evaluate(self, solution: Tour) -> float:
        return tour_length(self.points, solution)

    def parse(self, reply: str, family: str) -> Tour:
        return extract_tour(reply, family, self.n)

    def stop(self, family: str) -> list[str] | None:
        return [BASE_STOP] if family == "base" else None

    def _points_text(self) -> str:
        return ", ".join(f"({i}): ({x}, {y})" for i, (x, y) in enumerate(self.points))

    def meta_prompt(self, shown: Sequence[Scored], family: str) -> str:
        def tour(s: Scored) -> str:
            return ",".join(map(str, s.solution))

        if family == "base":
            lines = [BASE_POINTS.format(points=self._points_text()), "", BASE_INTRO, ""]
            lines += [BASE_ENTRY.format(tour=tour(s), length=display_value(s.value)) for s in shown]
            lines.append(BASE_OPEN)
            return "\n".join(lines)
        entries = [CHAT_ENTRY.format(tour=tour(s), length=display_value(s.value)) for s in shown]
        return "\n\n".join(
            [CHAT_POINTS.format(n=self.n, points=self._points_text()), CHAT_INTRO, "\n\n".join(entries), CHAT_REQUEST]
        )

    def describe(self, solution: Tour) -> str:
        return ",".join(map(str, solution))

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "points": [list(p) for p in self.points], "optimum": self._optimum}
