"""OPRO on linear regression: a language model fits a line by proposing (w, b) pairs.

The setting of the OPRO paper (Yang et al., 2024, section 3): data x = 1..50 and y = w*x + b + N(0, 1)
noise; the objective is the sum of squared residuals, which the prompt model only sees through the values of the
pairs tried so far. Each run starts from 5 random integer pairs in [10, 20]^2, samples 8 proposals per step at
temperature 1, and stops when the exact optimum (the best integer pair) is proposed. Each run has its own noise and
starting pairs (seed, seed + 1, ...).

The script prints one row in the style of the paper's Table 2 (steps and unique pairs needed to reach the optimum,
mean ± std over the runs that reached it) for the model used, with the closed-form least-squares line of each run,
a no-model baseline (uniformly random pairs in the starting box, through the same loop) and the paper's numbers for
orientation, and writes a plot of the best value per step (default ``runs/linear_regression.png``).

    python examples/linear_regression.py                               # embedded SmolLM2-135M, offline
    python examples/linear_regression.py --prompt-model openai/gpt-4o-mini --runs 5 --steps 50
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import dspy
import numpy as np

from dspy_opro.numeric import LinearRegression, OptimizationResult, optimize
from dspy_opro.plots import save_figure
from dspy_opro.testing import scripted_lm

START_BOX = (10, 20)  # the paper's range of the starting pairs, both coordinates

# Paper Table 2, (w, b) = (15, 14): steps to reach the optimum, mean ± std over 5 runs.
PAPER_STEPS_15_14 = {"text-bison": "5.8 ± 2.6", "gpt-3.5-turbo": "7.6 ± 4.5", "gpt-4": "4.0 ± 1.5"}
PAPER_NOTE = "far targets such as (w, b) = (36, -1) take 35-50 steps there"

Results = list[tuple[LinearRegression, OptimizationResult]]


def random_proposer(seed: int) -> dspy.LM:
    """A stand-in for the prompt model that proposes uniformly random integer pairs in the starting box.

    It answers the "base" meta-prompt (an open ``[``) without reading it. When the optimum lies in the
    box, this is the luck a weak model's score has to beat.
    """
    rng, lock = random.Random(seed), threading.Lock()
    low, high = START_BOX

    def reply(call) -> str:
        with lock:
            return f"{rng.randint(low, high)}, {rng.randint(low, high)}]"

    return scripted_lm(reply, model="scripted/random-pairs")


def run_all(
    args: argparse.Namespace, lm_for_seed: Callable[[int], dspy.BaseLM], family: str, label: str, threads: int
) -> Results:
    results = []
    for run in range(args.runs):
        seed = args.seed + run
        problem = LinearRegression(w_true=args.w, b_true=args.b, seed=seed, start_range=START_BOX)
        result = optimize(
            problem,
            prompt_model=lm_for_seed(seed),
            num_steps=args.steps,
            candidates_per_step=args.proposals,
            temperature=1.0,
            meta_prompt=family,
            seed=seed,
            num_threads=threads,
            log_dir=None if args.log_dir is None else args.log_dir / f"{label}-run{run + 1}",
            show_progress=label == "opro",
        )
        results.append((problem, result))
    return results


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "n/a"


def table_row(name: str, results: Results) -> str:
    reached = [r for _, r in results if r.reached_optimum]
    steps = [r.optimum_step for r in reached]
    pairs = [r.unique_proposed for r in reached]
    return f"{name:38} {len(reached):>4}/{len(results):<4} {mean_std(steps):>13} {mean_std(pairs):>15}"


def plot(results: Results, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (problem, result) in enumerate(results):
        color = f"C{i % 10}"
        label = f"run {i + 1}" + (f" (optimum at step {result.optimum_step})" if result.reached_optimum else "")
        ax.plot(range(len(result.best_per_step)), result.best_per_step, marker=".", color=color, label=label)
        ax.axhline(problem.optimum, color=color, linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (0: the 5 starting pairs)")
    ax.set_ylabel("best sum of squared residuals so far")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, "dotted: each run's exact optimum (best integer pair)", fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_numeric_arguments(parser, steps=50, out="runs/linear_regression.png")
    parser.add_argument("--runs", type=int, default=5, help="independent runs (the paper: 5); run i uses seed + i")
    parser.add_argument("--w", type=float, default=15, help="true slope")
    parser.add_argument("--b", type=float, default=14, help="true intercept")
    args = parser.parse_args(argv)
    common.configure_logging(args.verbose)
    # A continued "base" line holds one pair: "15, 14]".
    lm, family = common.numeric_prompt_model(args, base_tokens=16, chat_tokens=512)
    print(f"Linear regression, (w, b) = ({args.w:g}, {args.b:g}), x = 1..50, noise N(0, 1)")
    print(
        f"OPRO with {args.prompt_model} ({family} meta-prompt), {args.proposals} proposals/step, ≤ {args.steps} steps"
    )

    started = time.perf_counter()
    results = run_all(args, lambda seed: lm, family, "opro", args.threads)
    elapsed = time.perf_counter() - started
    for i, (problem, result) in enumerate(results):
        w_ls, b_ls = problem.least_squares
        counts = result.counts
        outcome = f"optimum at step {result.optimum_step}" if result.reached_optimum else "optimum not reached"
        print(
            f"run {i + 1}: least squares (w, b) = ({w_ls:.3f}, {b_ls:.3f}), best integer pair "
            f"{problem.optimum_solution} = {problem.optimum:.2f}; OPRO best {result.best_solution} = "
            f"{result.best_value:.2f}, {outcome}; {counts.samples} samples: {counts.valid} new pairs, "
            f"{counts.duplicates} repeats, {counts.invalid_total} unparsable, {counts.errors} failed calls"
        )
    baseline = run_all(args, random_proposer, "base", "random", 1)  # one thread: reproducible draws

    print()
    print(f"Table 2 style: (w, b) = ({args.w:g}, {args.b:g}), {args.runs} runs, at most {args.steps} steps")
    header = f"{'optimizer':38} {'reached':>9} {'#steps':>13} {'#unique pairs':>15}"
    print(header)
    print("-" * len(header))
    print(table_row(f"{args.prompt_model} (this machine)", results))
    print(table_row(f"no model: random pairs in {list(START_BOX)}^2", baseline))
    low, high = START_BOX
    outside = sum(any(not low <= c <= high for c in problem.optimum_solution) for problem, _ in baseline)
    if outside:
        print(
            f"  (the optimum lies outside that box in {outside} of {args.runs} runs: random pairs cannot reach it there)"
        )
    if (args.w, args.b) == (15, 14):
        for name, value in PAPER_STEPS_15_14.items():
            print(f"{'paper: ' + name:38} {'5/5':>9} {value:>13} {'':>15}")
    print(
        "#steps, #unique pairs: mean ± std over the runs that reached the optimum; #unique pairs counts the distinct "
        "new pairs proposed (starting pairs excluded)."
    )
    print(f"Paper numbers are for orientation only (other models; {PAPER_NOTE}). OPRO time: {elapsed:.0f} s")

    title = f"OPRO linear regression, (w, b) = ({args.w:g}, {args.b:g}), {args.prompt_model}"
    plot(results, args.out, title)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
