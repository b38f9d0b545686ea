"""How much the instruction matters on each task of the suite (`dspy_opro.tasks.suite`).

For every task, the program ``dspy.Predict("<input> -> answer")`` is scored on the same held-out
examples under each of the task's hand-written instructions: the one an optimizer starts from
(``start``), a neutral one, a good one and others. A task qualifies for the optimizer benchmark
when the spread between its worst and best instruction is at least ``--min-spread`` points and
the start is at least ``--min-headroom`` points below the best (an optimizer has something to
find). It prints one markdown table of accuracies and one of the verdicts.

    python benchmarks/task_suite.py                      # all tasks, 60 examples each, local/smollm2
    python benchmarks/task_suite.py --tasks plural antonym --examples 40 --show 3
    python benchmarks/task_suite.py --task-model openai/gpt-4o-mini
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dspy  # noqa: E402
from optimizers import task_model_setup  # noqa: E402

from dspy_opro.tasks.suite import SUITE  # noqa: E402


def score_instructions(task, instructions: dict[str, str], examples, lm, threads: int, show: int) -> dict[str, dict]:
    """Accuracy (%) of each instruction on ``examples``, with the first ``show`` replies."""
    results = {}
    for role, text in instructions.items():
        start = time.perf_counter()
        evaluate = dspy.Evaluate(
            devset=examples, metric=task.metric, num_threads=threads, display_progress=False, max_errors=0
        )
        with dspy.context(lm=lm):
            outcome = evaluate(task.make_program(text))
        replies = [(getattr(e, task.input_field), str(getattr(p, "answer", p)), s) for e, p, s in outcome.results]
        results[role] = {
            "instruction": text,
            "accuracy": float(outcome.score),
            "seconds": round(time.perf_counter() - start, 1),
            "replies": replies[:show],
        }
    return results


def verdict(results: dict[str, dict], min_spread: float, min_headroom: float) -> dict:
    """Spread (best - worst), headroom (best - start) and whether the task qualifies."""
    scores = {role: r["accuracy"] for role, r in results.items()}
    best, worst = max(scores.values()), min(scores.values())
    headroom = best - scores.get("start", best)
    return {
        "spread": best - worst,
        "headroom": headroom,
        "best": max(scores, key=scores.get),
        "qualifies": best - worst >= min_spread and headroom >= min_headroom,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--task-model", default="local/smollm2")
    parser.add_argument("--examples", type=int, default=60, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the examples (the benchmark uses 0, 1, ...)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-spread", type=float, default=30.0)
    parser.add_argument("--min-headroom", type=float, default=20.0)
    parser.add_argument("--show", type=int, default=0, help="print this many replies per instruction")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.getLogger("dspy").setLevel(logging.ERROR)

    lm = task_model_setup(args.task_model, cache=False)
    everything = {}
    start = time.perf_counter()
    for name in args.tasks:
        task = SUITE[name]
        examples = task.make_dataset(args.examples, seed=args.seed)
        results = score_instructions(task, task.instructions, examples, lm, args.threads, args.show)
        everything[name] = {"results": results, **verdict(results, args.min_spread, args.min_headroom)}
        for role, r in results.items():
            print(
                f"{name:16} {role:20} {r['accuracy']:5.1f}%  ({r['seconds']:.0f} s)  {r['instruction']!r}", flush=True
            )
            for text, reply, score in r["replies"]:
                print(f"{'':18}{score:.0f}  {text!r} -> {reply[:90]!r}")

    print(
        f"\nTask model {args.task_model}; {args.examples} examples per task (seed {args.seed}); "
        f"{time.perf_counter() - start:.0f} s.\n"
    )
    print("| task | conveys | instruction | role | accuracy % |")
    print("|---|---|---|---|---:|")
    for name, entry in everything.items():
        for role, r in entry["results"].items():
            print(f"| {name} | {SUITE[name].conveys} | {r['instruction']!r} | {role} | {r['accuracy']:.1f} |")
    print("\n| task | start % | best % (role) | spread (points) | start below best (points) | qualifies |")
    print("|---|---:|---:|---:|---:|---|")
    for name, entry in everything.items():
        results = entry["results"]
        print(
            f"| {name} | {results['start']['accuracy']:.1f} | {results[entry['best']]['accuracy']:.1f} "
            f"({entry['best']}) | {entry['spread']:.1f} | {entry['headroom']:.1f} | "
            f"{'yes' if entry['qualifies'] else 'no'} |"
        )
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
