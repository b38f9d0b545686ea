"""Matplotlib panels for OPRO runs: the score trajectory and a bar chart of held-out scores.

Each function draws on an ``Axes`` the caller made, so scripts can lay panels out as they like::

    fig, ax = plt.subplots()
    draw_trajectory(ax, optimized.trajectory)      # the compiled program's per-step record (track_stats=True)
    save_figure(fig, "runs/trajectory.png")

`save_figure` writes a figure; `plot_trajectory` draws and writes the trajectory alone (the demo job's
plot). matplotlib is not a dependency of the package (it comes with the ``examples`` extra); it is
imported only inside the functions that make or write a figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BEST_COLOR = "#dd8452"
OTHER_COLOR = "#4c72b0"
CANDIDATE_COLOR = "0.55"


def draw_trajectory(ax: Any, trajectory: Sequence[Mapping[str, Any]], *, legend_loc: str = "lower right") -> None:
    """Training score per step: each candidate scored at a step as a dot, the best so far as a line.

    Args:
        ax: A matplotlib ``Axes``.
        trajectory: One record per step with ``step``, ``best_score`` and ``candidate_scores``, as OPRO's
            compiled program carries it in ``trajectory``. Step 0 (the initial instructions) with no candidate
            scores is shown by its best score.
        legend_loc: Where the legend goes.
    """
    from matplotlib.ticker import MaxNLocator

    for record in trajectory:
        scores = list(record.get("candidate_scores") or [])
        if not scores and record["step"] == 0:
            scores = [record["best_score"]]
        scores = [score for score in scores if score is not None]
        count = len(scores)
        # Side by side within the step: equal scores would otherwise hide each other.
        xs = [record["step"] + (0.3 * (i / (count - 1) - 0.5) if count > 1 else 0.0) for i in range(count)]
        ax.scatter(xs, scores, color=CANDIDATE_COLOR, s=14, alpha=0.7, zorder=2)
    ax.plot(
        [record["step"] for record in trajectory],
        [record["best_score"] for record in trajectory],
        color=BEST_COLOR,
        marker="o",
        label="best so far",
        zorder=3,
    )
    ax.scatter([], [], color=CANDIDATE_COLOR, s=14, label="candidates scored at that step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("OPRO step (0: initial instructions)")
    ax.set_ylabel("training accuracy (%)")
    ax.legend(fontsize=8, loc=legend_loc)


def draw_scores(
    ax: Any,
    rows: Sequence[tuple[str, float, bool]],
    *,
    xlabel: str = "test accuracy (%)",
    wrap: int = 32,
    xmax: float | None = None,
) -> None:
    """Horizontal bars, one per ``(label, score, highlighted)`` row, top to bottom; highlighted bars in orange.

    Args:
        ax: A matplotlib ``Axes``.
        rows: The bars; labels are wrapped to ``wrap`` characters per line.
        xlabel: The axis label.
        wrap: Characters per label line.
        xmax: Right end of the axis; default a little beyond the largest score, at most 100.
    """
    if not rows:
        raise ValueError("draw_scores needs at least one row")
    positions = list(range(len(rows)))
    ax.barh(positions, [score for _, score, _ in rows], color=[BEST_COLOR if hi else OTHER_COLOR for *_, hi in rows])
    for y, (_, score, _) in zip(positions, rows, strict=True):
        ax.text(score, y, f" {score:.1f}", va="center", fontsize=8)
    ax.set_yticks(positions, ["\n".join(textwrap.wrap(label, wrap)) or " " for label, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    if xmax is None:
        xmax = min(100.0, max(10.0, 1.3 * max(score for _, score, _ in rows)))
    ax.set_xlim(0, xmax)
    ax.set_xlabel(xlabel)


def save_figure(fig: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Lay ``fig`` out, write it as a PNG at ``path`` (creating the folder) and close it.

    Args:
        fig: A matplotlib ``Figure``.
        path: Where the PNG goes.
        title: A title over all panels, if any.

    Returns:
        The path written.
    """
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_trajectory(trajectory: Sequence[Mapping[str, Any]], path: str | Path, *, title: str) -> Path:
    """Write a PNG of the training score per step (`draw_trajectory`) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_trajectory(ax, trajectory)
    ax.set_title(title)
    return save_figure(fig, path)
