"""How well each rule for OPRO's final choice picks among the validated finalists, on held-out test data.

OPRO ends by scoring a few finalists (the best by training score, and the start) on the validation
set and returning one of them (`dspy_opro.selection`). This script takes the OPRO runs recorded in
``--results`` (by `benchmarks/optimizers.py`), scores every validated finalist of each run on that
run's test split, and reports the mean test accuracy that each rule of choice would have returned:

- ``validation``: the best validation score, ties by training score (OPRO's rule, `dspy_opro.selection.rank`);
- ``pooled``: the best score over training and validation examples together, ties by validation score;
- ``train``: the best training score (what a run without a valset returns);
- ``start``: the starting instruction (no optimization);
- ``oracle``: the best test score among the finalists (what no rule can beat).

Greedy decoding makes a program's test score a function of its instructions, so each finalist is
scored once; the scores are appended to ``--scores`` and reused by a rerun.

    python benchmarks/final_choice.py --results benchmarks/results/optimizers.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dspy  # noqa: E402
import optimizers as bench  # noqa: E402

from dspy_opro.models import setup_models  # noqa: E402
from dspy_opro.selection import rank  # noqa: E402

RULES = ("validation", "pooled", "train", "start", "oracle")


def finalists(record: dict) -> list[dict]:
    """The run's validated candidates, as `benchmarks/optimizers.opro_details` recorded them."""
    return [c for c in record["details"].get("top", []) if c.get("val_score") is not None]


def choose(rule: str, candidates: list[dict], sizes: dict) -> dict:
    """The finalist ``rule`` returns; the earlier candidate wins a remaining tie."""
    if rule == "validation":  # OPRO's own rule
        return max(candidates, key=lambda c: rank(SimpleNamespace(**c)))
    n_train, n_val = sizes["train"], sizes["val"]
    key = {
        "pooled": lambda c: ((c["score"] * n_train + c["val_score"] * n_val) / (n_train + n_val), c["val_score"]),
        "train": lambda c: (c["score"],),
        "start": lambda c: (c["step"] == 0,),
        "oracle": lambda c: (c["test"],),
    }[rule]
    return max(candidates, key=lambda c: (*key(c), -c["id"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results/optimizers.jsonl")
    parser.add_argument("--scores", default="benchmarks/results/final_choice.jsonl")
    parser.add_argument("--optimizers", nargs="+", default=None, help="OPRO columns to use (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("dspy").setLevel(logging.ERROR)
    records = [
        r
        for r in bench.read_results(Path(args.results))
        if r["optimizer"] in bench.OPRO_VARIANTS
        and (args.optimizers is None or r["optimizer"] in args.optimizers)
        and len(finalists(r)) >= 2
    ]
    scores_path = Path(args.scores)
    known = {}
    if scores_path.exists():
        for line in scores_path.read_text().splitlines():
            row = json.loads(line)
            known[tuple(row["key"])] = row["test_score"]
    models = None
    per_rule: dict[str, list[float]] = {rule: [] for rule in RULES}
    changed = 0
    for record in records:
        sizes = {"train": record["train"], "val": record["val"]}
        task = None
        candidates = []
        for c in finalists(record):
            key = (
                record["task"],
                record["seed"],
                record["train"],
                record["val"],
                record["test"],
                record["task_model"],
                c["instruction"],
            )
            if key not in known:
                if c["instruction"] in record["instructions"]:
                    known[key] = record["test_score"]
                else:
                    if models is None:
                        models = setup_models(record["task_model"], record["prompt_model"])
                    if task is None:
                        task = bench.load_task(
                            record["task"],
                            seed=record["seed"],
                            n_train=record["train"],
                            n_val=record["val"],
                            n_test=record["test"],
                            data_dir=None,
                        )
                    student = dspy.Predict(task.signature)
                    student.signature = student.signature.with_instructions(c["instruction"])
                    with models.context():
                        known[key] = bench.evaluate(student, task.test, task.metric, args.threads)
                with scores_path.open("a") as f:
                    f.write(json.dumps({"key": list(key), "test_score": known[key]}) + "\n")
            candidates.append({**c, "test": known[key]})
        picked = {rule: choose(rule, candidates, sizes) for rule in RULES}
        for rule, c in picked.items():
            per_rule[rule].append(c["test"])
        changed += picked["pooled"]["id"] != picked["validation"]["id"]
        print(
            f"{record['task']:12s} seed {record['seed']} {record['optimizer']:17s} "
            + " ".join(f"{rule} {c['test']:5.1f}" for rule, c in picked.items()),
            flush=True,
        )
    print(f"\n{len(records)} runs; pooled and validation pick different finalists in {changed}.")
    print("| rule | mean test % | runs where it beats `validation` | where it loses |")
    print("|---|---:|---:|---:|")
    base = per_rule["validation"]
    for rule, values in per_rule.items():
        wins = sum(a > b for a, b in zip(values, base, strict=True))
        losses = sum(a < b for a, b in zip(values, base, strict=True))
        print(f"| {rule} | {statistics.fmean(values):.2f} | {wins} | {losses} |")


if __name__ == "__main__":
    main()
