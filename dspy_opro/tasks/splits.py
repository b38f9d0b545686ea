"""Seeded splits of a task's examples, as in the paper (e.g. 20% of a BBH task for training)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import dspy


def split_examples(
    examples: Sequence[dspy.Example], sizes: Sequence[int | float], *, seed: int = 0
) -> list[list[dspy.Example]]:
    """Shuffle with ``seed`` and cut into consecutive parts.

    Args:
        examples: All examples.
        sizes: Part sizes, as counts or as fractions of ``len(examples)``; whatever is left
            over is dropped.
        seed: Shuffle seed.

    Returns:
        One list per size, disjoint.
    """
    counts = [round(s * len(examples)) if isinstance(s, float) else int(s) for s in sizes]
    if any(c < 0 for c in counts) or sum(counts) > len(examples):
        raise ValueError(f"sizes {list(sizes)} ask for {sum(counts)} examples; only {len(examples)} exist")
    order = list(examples)
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for count in counts:
        parts.append(order[start : start + count])
        start += count
    return parts
