"""Screening: score new candidates on a growing minibatch and stop early on the hopeless ones.

The reference scores every candidate on the whole training set (on GSM8K about 2,000 scorer
calls per step), although most proposals are worse than the best instruction so far. With
screening, a step's new candidates are scored together on the first ``first_batch`` examples
of a fixed random order of the training set, then on the next examples so the evaluated
prefix doubles each round, until the whole set is done. After each round a candidate is
dropped when even an optimistic estimate of its full-set score — the Wilson upper confidence
bound at ``z`` standard errors — is below the current best score: it could not replace the
best, so the rest of its calls are saved. Survivors are scored on every example, so the best
program is always chosen on full-set scores; a dropped candidate keeps the score measured on
the examples it was run on, which is what the meta-prompt shows for it.

Under ``max_metric_calls`` a step starts every new candidate whose first minibatch fits in the
budget, and a later round that would pass it goes on with the leading candidates only.
A round is decided only once every example of it has a score: `Scorer.evaluate` runs failed
examples again before it returns, and a candidate's failures add up over its rounds against
``max_errors``. A run that stopped replays the rounds from what it had measured, so it takes
the same decisions and runs only the examples that have no score.
`affordable` says how many new candidates a budget can start, screened or not.
`dspy_opro.OPRO` screens by default; ``screening=False`` scores as the reference does.

``screening="minibatch"`` is the cheaper schedule, the rule GEPA uses to accept a candidate: every new
candidate is scored on the first minibatch only (the same examples for every candidate of the run,
`minibatch`), and only a candidate that scores strictly higher there than the current best program
does on those same examples is scored on the rest of the set. Most candidates then cost one minibatch,
so a budget buys more steps; every candidate has a score on the same examples, which is what the
meta-prompt shows in this schedule (`shown_score`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import dspy

from .calls import TaskFailureError
from .scoring import Evaluation, Scorer

DEFAULT_Z = 2.0
MIN_FIRST_BATCH = 8


def wilson_upper(mean: float, n: int, z: float = DEFAULT_Z) -> float:
    """Upper Wilson score bound of a success rate ``mean`` observed on ``n`` examples."""
    if n <= 0:
        return 1.0
    mean = min(max(mean, 0.0), 1.0)
    z2 = z * z
    centre = mean + z2 / (2 * n)
    spread = z * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def batch_ends(n_examples: int, first_batch: int) -> list[int]:
    """Cumulative sizes of the evaluated prefix after each round: first, 2 x first, ..., n."""
    ends, end = [], max(1, first_batch)
    while end < n_examples:
        ends.append(end)
        end *= 2
    return ends + [n_examples]


def first_batch_size(n_examples: int) -> int:
    """An eighth of the set, but at least `MIN_FIRST_BATCH` examples."""
    return max(MIN_FIRST_BATCH, math.ceil(n_examples / 8))


def affordable(candidates: int, n_examples: int, budget: float, *, screened: bool) -> int:
    """How many of ``candidates`` new candidates ``budget`` metric calls can start.

    A screened candidate may cost only its first minibatch (`screen` then keeps within the budget);
    a candidate scored in full costs the whole set.
    """
    if budget == math.inf:
        return candidates
    cost = first_batch_size(n_examples) if screened else n_examples
    return max(0, min(candidates, int(budget // cost)))


SCHEDULES = (True, False, "minibatch")
"""The values of ``OPRO(screening=...)``: the bound rounds, full scoring, the minibatch schedule."""


def check_schedule(screening: object) -> bool | str:
    """``screening`` as one of `SCHEDULES`, or a `ValueError` that lists them."""
    if screening in SCHEDULES:
        return screening if isinstance(screening, str) else bool(screening)
    raise ValueError(
        f"screening={screening!r} is not a schedule: use True (stop hopeless candidates early, the default), "
        'False (score every candidate on the whole trainset, as the paper does) or "minibatch" (score every '
        "candidate on one minibatch and the rest of the set only when it beats the best there)"
    )


def minibatch(n_examples: int, seed: int) -> list[int]:
    """The examples every candidate is scored on first: the first round of `example_order`."""
    return example_order(n_examples, seed)[: min(n_examples, first_batch_size(n_examples))]


def shown_score(per_example: Sequence[float | None], examples: Sequence[int]) -> float | None:
    """The score, 0-100, on ``examples``; ``None`` when one of them has no score."""
    values = [per_example[j] for j in examples]
    if any(v is None for v in values):
        return None
    return 100.0 * sum(values) / len(values)


def example_order(n_examples: int, seed: int) -> list[int]:
    """The fixed order in which screening visits the training set."""
    order = list(range(n_examples))
    random.Random(f"{seed}:screening").shuffle(order)
    return order


def screen(
    scorer: Scorer,
    programs: Sequence[dspy.Module],
    examples: Sequence[dspy.Example],
    *,
    threshold: float,
    order: Sequence[int],
    z: float = DEFAULT_Z,
    first_batch: int | None = None,
    max_calls: int | None = None,
    known: Sequence[Evaluation | None] | None = None,
    against: Sequence[float | None] | None = None,
) -> list[Evaluation]:
    """Score ``programs`` with early stopping (see the module docstring).

    Args:
        scorer: Runs programs on examples.
        programs: The new candidates.
        examples: The training set.
        threshold: The score to beat, 0-100 (as `dspy_opro.scoring.Evaluation.score`).
        order: A permutation of the example indices.
        z: Width of the confidence bound in standard errors; larger drops fewer candidates.
        first_batch: Size of the first round; `first_batch_size` by default.
        max_calls: Most (program, example) runs to spend. A round that would exceed it goes on
            with the candidates that lead so far, as many as fit; the others keep their partial
            scores (``evaluated`` below the set size), and screening ends when nothing fits.
        known: Per program, results measured on ``examples`` by a run that stopped. Rounds are
            replayed in the same order with the same decisions; only examples without a score run.
        against: The minibatch schedule: the current best program's per-example scores. After the
            first round only the candidates that score strictly higher than it on that round's
            examples go on, and they are scored on the rest of the set in one round; ``threshold``
            and ``z`` are then not used.

    Returns:
        One `Evaluation` per program; ``scores[j]`` is ``None`` for examples it was not run on.
        A failure stops screening with `dspy_opro.calls.TaskFailureError` as `Scorer.evaluate`
        does; its ``partial`` then holds one evaluation per program on the whole set, ``known``
        results included.
    """
    n = len(examples)
    results = [Evaluation.empty(n, traces=True) for _ in programs]
    for i, earlier in enumerate(known or []):
        results[i].failures = earlier.failures if earlier is not None else 0
    alive = list(range(len(programs)))
    start, left = 0, max_calls
    ends = batch_ends(n, first_batch or first_batch_size(n))
    if against is not None:
        ends = sorted({ends[0], n})
    for end in ends:
        chunk = list(order[start:end])
        if left is not None:
            fit = left // len(chunk)
            if fit < len(alive):  # leaders first; ties keep the proposal order
                alive = sorted(sorted(alive, key=lambda i: -results[i].score)[:fit])
            left -= len(alive) * len(chunk)
        if not alive:
            break
        before = [_round_input(results[i], known[i] if known else None, chunk) for i in alive]
        try:
            evaluations = scorer.evaluate(
                [programs[i] for i in alive],
                [examples[j] for j in chunk],
                capture_traces=True,
                known=before,
                numbers=chunk,
            )
        except TaskFailureError as stop:
            for i, evaluation in zip(alive, stop.partial, strict=True):
                results[i].update(evaluation, chunk)
            stop.partial = [_with_known(result, known[i] if known else None) for i, result in enumerate(results)]
            raise
        for i, evaluation in zip(alive, evaluations, strict=True):
            results[i].update(evaluation, chunk)
        start = end
        if end < n and against is not None:
            to_beat = shown_score(against, chunk)
            alive = [i for i in alive if _beats(shown_score(results[i].scores, chunk), to_beat)]
        elif end < n:
            # The bound is on the success rate, a fraction: scores are percentages.
            alive = [i for i in alive if wilson_upper(results[i].score / 100, end, z) >= threshold / 100]
        if not alive:
            break
    return results


def _beats(score: float | None, to_beat: float | None) -> bool:
    """The minibatch schedule's rule: strictly higher than the best on the same examples."""
    return score is not None and (to_beat is None or score > to_beat)


def _round_input(result: Evaluation, known: Evaluation | None, chunk: list[int]) -> Evaluation:
    """What a round starts from: earlier results on ``chunk`` (none yet) and the failures counted so far."""
    start = (known or result).subset(chunk)
    start.failures, start.strikes = result.failures, result.strikes
    return start


def _with_known(result: Evaluation, known: Evaluation | None) -> Evaluation:
    """``result`` completed with the earlier results it has not reached yet (nothing measured is lost)."""
    if known is None:
        return result
    merged = Evaluation.empty(len(result.scores), traces=True)
    merged.update(known, range(len(result.scores)))
    reached = [j for j, s in enumerate(result.scores) if s is not None or j in result.failed | result.program_errors]
    merged.update(result.subset(reached), reached)
    merged.failures = result.failures
    return merged
