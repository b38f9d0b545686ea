"""OPRO on the traveling salesman problem: a language model proposes tours through random points.

The setting of the OPRO paper (Yang et al., 2024, section 3): n points with integer coordinates in [-100, 100]^2,
5 random starting tours from point 0, a meta-prompt that lists the points and the 10 best tours so far with their
lengths (longest first), 8 valid proposals per step at temperature 1. Every proposed tour is checked (starts at 0,
visits every point exactly once); invalid replies are re-sampled, but at most ``--max-samples`` per step, so a
model that never writes a valid tour still ends the run.

The script prints OPRO's best tour beside the classical baselines, nearest neighbour, farthest insertion and, for
n <= 13, the exact optimum by dynamic programming, as optimality gaps, with the paper's Table 3 numbers for
orientation, and plots the tours (default ``runs/tsp.png``). The paper is explicit that OPRO is not meant to beat
TSP heuristics: it shows that prompting alone can make progress.

    python examples/tsp.py                                  # embedded SmolLM2-135M, offline, n = 10
    python examples/tsp.py --prompt-model openai/gpt-4o-mini --n 10 --steps 50
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common as common

from dspy_opro.numeric import (
    OptimizationResult,
    TravelingSalesman,
    farthest_insertion,
    nearest_neighbour,
    optimality_gap,
    optimize,
    tour_length,
)
from dspy_opro.numeric.tsp import MAX_EXACT_NODES
from dspy_opro.plots import save_figure

# Paper Table 3: optimality gap in percent, averaged over 5 problems per n.
PAPER_GAPS = {
    10: {"nearest neighbour": 13.0, "farthest insertion": 3.2, "OPRO gpt-4": 0.0},
    20: {"nearest neighbour": 16.0, "farthest insertion": 0.2, "OPRO gpt-4": 1.4},
    50: {"nearest neighbour": 19.7, "farthest insertion": 9.8, "OPRO gpt-4": 11.0},
}


def plot(problem: TravelingSalesman, tours: list[tuple[str, tuple[int, ...]]], result: OptimizationResult, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimum = problem.optimum
    fig, grid = plt.subplots(2, 3, figsize=(10, 6.8))
    axes = list(grid.flat)
    for ax in axes[len(tours) + 1 :]:
        ax.axis("off")
    xs, ys = zip(*problem.points, strict=True)
    for ax, (name, tour) in zip(axes, tours, strict=False):
        closed = [*tour, tour[0]]
        ax.plot([problem.points[i][0] for i in closed], [problem.points[i][1] for i in closed], "-", color="C0")
        ax.scatter(xs, ys, s=14, color="k", zorder=3)
        ax.scatter(*problem.points[0], s=50, color="C3", zorder=4)
        length = tour_length(problem.points, tour)
        gap = "" if optimum is None else f", gap {optimality_gap(length, optimum):.1f}%"
        ax.set_title(f"{name}\nlength {length:.0f}{gap}", fontsize=8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[len(tours)]
    ax.plot(range(len(result.best_per_step)), result.best_per_step, marker=".", label="OPRO best so far")
    for i, (name, tour) in enumerate(tours[1:]):
        ax.axhline(tour_length(problem.points, tour), linestyle=":", linewidth=1, label=name, color=f"C{i + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("tour length")
    ax.set_title("OPRO trajectory", fontsize=8)
    ax.legend(fontsize=6)
    fig.suptitle(f"TSP, n = {problem.n} (red: point 0)", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_numeric_arguments(parser, steps=30, out="runs/tsp.png")
    parser.add_argument("--n", type=int, default=10, help="number of points")
    parser.add_argument(
        "--max-samples", type=int, default=None, help="most replies sampled per step (default: 3 x --proposals)"
    )
    args = parser.parse_args(argv)
    common.configure_logging(args.verbose)

    problem = TravelingSalesman(n=args.n, seed=args.seed)
    # One "base" tour is about 2-3 tokens per point.
    lm, family = common.numeric_prompt_model(args, base_tokens=4 * args.n + 8, chat_tokens=1024)
    print(f"TSP, n = {problem.n} random points in [-100, 100]^2 (seed {args.seed})")
    print(
        f"OPRO with {args.prompt_model} ({family} meta-prompt), {args.proposals} valid proposals/step, ≤ {args.steps} steps"
    )

    started = time.perf_counter()
    result = optimize(
        problem,
        prompt_model=lm,
        num_steps=args.steps,
        candidates_per_step=args.proposals,
        max_samples_per_step=args.max_samples or 3 * args.proposals,
        temperature=1.0,
        meta_prompt=family,
        seed=args.seed,
        num_threads=args.threads,
        log_dir=args.log_dir,
    )
    elapsed = time.perf_counter() - started

    start_best = min((p for p in result.proposals if p.status == "initial"), key=lambda p: p.value)
    rows = [
        ("nearest neighbour", nearest_neighbour(problem.points)),
        ("farthest insertion", farthest_insertion(problem.points)),
        ("best starting tour (random)", start_best.solution),
        (f"OPRO, {args.prompt_model}", result.best_solution),
    ]
    if problem.exact_tour is not None:
        rows.insert(0, ("exact optimum (Held-Karp DP)", problem.exact_tour))
    optimum = problem.optimum

    print()
    header = f"{'method':40} {'length':>8} {'gap to optimum':>15}"
    print(header)
    print("-" * len(header))
    for name, tour in rows:
        length = tour_length(problem.points, tour)
        gap = "n/a" if optimum is None else f"{optimality_gap(length, optimum):.1f}%"
        print(f"{name:40} {length:>8.1f} {gap:>15}")
    if optimum is None:
        print(f"(no exact optimum: the dynamic program is limited to n <= {MAX_EXACT_NODES})")
    counts = result.counts
    outcome = f"reached the optimum at step {result.optimum_step}" if result.reached_optimum else "optimum not reached"
    print(
        f"OPRO: {result.steps_run} steps, {outcome}; {counts.samples} samples: {counts.valid} new valid tours, "
        f"{counts.duplicates} repeats, {counts.invalid_total} invalid {dict(sorted(counts.invalid.items()))}, "
        f"{counts.errors} failed calls; {elapsed:.0f} s"
    )
    print(f"OPRO best tour: {','.join(map(str, result.best_solution))}")
    print()
    print("Paper Table 3, optimality gap % (for orientation only: other models, 5 problems per n):")
    for n, gaps in PAPER_GAPS.items():
        mark = "  <- this n" if n == problem.n else ""
        print(f"  n = {n:>2}: " + ", ".join(f"{name} {gap:.1f}" for name, gap in gaps.items()) + mark)

    tours = [(name, tour) for name, tour in rows if not name.startswith("best starting")]
    tours = [tours[-1], *tours[:-1]]  # OPRO first
    plot(problem, tours, result, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
