"""Which training examples the meta-prompt shows at each step.

The four strategies of the OPRO reference:

- ``"random"``: drawn afresh every step (seeded by the run seed and the step number).
- ``"constant"``: the same examples at every step.
- ``"accumulative_most_frequent"``: drawn from every example that any scored instruction of
  this predictor has answered wrongly so far.
- ``"current_most_frequent"``: the examples most often answered wrongly by the instructions
  currently shown in the meta-prompt.

and one of this package's, the default:

- ``"best_wrong"``: drawn afresh every step from the examples the current best program answers
  wrongly, so that the meta-prompt shows how the best instruction fails (with ``feedback``, the
  program's answer and the metric's feedback are shown beside them).

When a wrong-answer strategy has fewer candidates than requested (early in a run), the rest
is filled at random so the meta-prompt always shows ``k`` examples when the data allows.
"""

from __future__ import annotations

import random
from collections import Counter

EXEMPLAR_STRATEGIES = ("random", "constant", "accumulative_most_frequent", "current_most_frequent", "best_wrong")


def _fill(chosen: list[int], n_examples: int, k: int, rng: random.Random) -> list[int]:
    if len(chosen) < k:
        rest = [i for i in range(n_examples) if i not in set(chosen)]
        chosen = chosen + rng.sample(rest, min(k - len(chosen), len(rest)))
    return sorted(chosen)


def select_exemplars(
    strategy: str,
    *,
    n_examples: int,
    k: int,
    seed: int,
    step: int,
    wrong_ever: Counter | None = None,
    wrong_current: Counter | None = None,
    wrong_best: list[int] | None = None,
    salt: str = "",
) -> list[int]:
    """Indices of the training examples to show, sorted ascending.

    Args:
        strategy: One of `EXEMPLAR_STRATEGIES`.
        n_examples: Size of the training set.
        k: How many to show.
        seed: The run seed.
        step: The optimization step (the draw for a step is the same on every run and resume).
        wrong_ever: Example index -> how many scored instructions got it wrong, over the run.
        wrong_current: The same count over the instructions shown in this meta-prompt.
        wrong_best: The examples the current best program answers wrongly.
        salt: Distinguishes independent draws within one step (e.g. one per predictor).
    """
    if strategy not in EXEMPLAR_STRATEGIES:
        raise ValueError(f"exemplar_selection must be one of {EXEMPLAR_STRATEGIES}, got {strategy!r}")
    k = min(k, n_examples)
    if k <= 0:
        return []
    if strategy == "constant":
        return sorted(random.Random(f"{seed}:constant:{salt}").sample(range(n_examples), k))
    rng = random.Random(f"{seed}:exemplars:{step}:{salt}")
    if strategy == "random":
        return sorted(rng.sample(range(n_examples), k))
    if strategy in ("accumulative_most_frequent", "best_wrong"):
        if strategy == "best_wrong":
            pool = sorted(set(wrong_best or ()))
        else:
            pool = sorted(i for i, count in (wrong_ever or {}).items() if count > 0)
        chosen = rng.sample(pool, k) if len(pool) > k else pool
        return _fill(chosen, n_examples, k, rng)
    counts = {i: c for i, c in (wrong_current or {}).items() if c > 0}
    order = list(counts)
    rng.shuffle(order)  # random tie-breaking among equally frequent examples
    order.sort(key=lambda i: -counts[i])
    return _fill(order[:k], n_examples, k, rng)
