"""OPRO against DSPy's instruction optimizers, side by side, at an equal metric-call budget.

On the same program, task model, prompt model, training, validation and test sets and seeds,
this runs the unoptimized baseline, OPRO, DSPy's COPRO, MIPROv2 (instruction-only: no demos) and
GEPA, each given the same number of metric calls, and reports held-out test accuracy (mean ± std
over seeds), metric calls, prompt-model and task-model LM calls and tokens, and wall time.

Tasks: the suite of instruction-sensitive tasks (`dspy_opro.tasks.suite`; ``suite`` means all of
them), the demo task, ``gsm8k`` and ``bbh:<task>`` (``--data-dir`` for the release files).

Optimizers (``--optimizers``):

- ``baseline``: the program as given (the task's start instruction), no optimization;
- ``opro``: OPRO with its defaults (screening on; at most 20 steps of 8 proposals),
  ``max_metric_calls`` = the budget;
- ``opro-paper``: ``OPRO.paper_defaults()`` (full scoring, random exemplars with their answers
  only) with the prompt model's meta-prompt family, at the same budget;
- ``opro-v0``: OPRO's defaults before the search changes (the "base" family without exemplars,
  screening estimates shown); ``opro-estimates``, ``opro-nofeedback`` and ``opro-noexemplars``
  undo one change each, ``opro-minibatch`` adds the minibatch schedule (`OPRO_VARIANTS`);
- ``copro``: ``dspy.COPRO``; a single-predictor program costs breadth x depth x len(trainset)
  metric calls, so it runs depth 3 (else 2, else 1) with the largest breadth (>= 4) that fits;
- ``mipro``: ``dspy.MIPROv2`` with ``max_bootstrapped_demos=0, max_labeled_demos=0``, 8
  instruction candidates and the trials that fit the budget (it has no hard cap);
- ``gepa``: ``dspy.GEPA`` with ``max_metric_calls`` = the budget and the prompt model as
  ``reflection_lm``; its proposer prompts through the same adapter as COPRO's and MIPROv2's
  (`SmallModelAdapter` for a local prompt model);
- ``gepa-json``: the same with GEPA's own proposer adapter (DSPy's JSONAdapter) whatever the model.

Each optimizer gets the prompt model in the form it works best with: OPRO as chosen by
`dspy_opro.models.optimizer_model` (for a local model, raw text completion and the "base"
meta-prompt family); COPRO, MIPROv2 and GEPA, which prompt through DSPy's adapters, as a chat LM.
With a local task model every program runs through `SmallModelAdapter` (DSPy's ChatAdapter fails
to parse most of a 135M model's replies).

Every finished (task, optimizer, seed) run is appended at once as one JSON line to ``--results``;
a rerun with the same settings skips the runs already there, so a long benchmark can be stopped,
resumed and extended (more seeds, tasks or optimizers). ``--report`` only reads that file and
prints the tables (markdown) and writes the plot.

    python benchmarks/optimizers.py --tasks suite demo --seeds 0 1 2
    python benchmarks/optimizers.py --tasks bbh:boolean_expressions gsm8k --data-dir ../shared/data
    python benchmarks/optimizers.py --tasks plural --task-model openai/gpt-4o-mini --prompt-model openai/gpt-4o-mini
    python benchmarks/optimizers.py --report --results runs/optimizers.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dspy  # noqa: E402

from dspy_opro import OPRO  # noqa: E402
from dspy_opro.counting import CallCounter  # noqa: E402
from dspy_opro.faults import FATAL, classify, describe  # noqa: E402
from dspy_opro.local.names import is_local_model  # noqa: E402
from dspy_opro.models import ModelSetup, setup_models  # noqa: E402
from dspy_opro.plots import save_figure  # noqa: E402
from dspy_opro.tasks import bbh_metric, gsm8k_metric, load_bbh, load_gsm8k, split_examples  # noqa: E402
from dspy_opro.tasks.suite import SUITE  # noqa: E402

OPRO_VARIANTS: dict[str, dict[str, Any]] = {
    "opro": {},  # OPRO's defaults
    "opro-paper": {},  # OPRO.paper_defaults(), with the prompt model's meta-prompt family
    # OPRO's defaults before the search changes (no exemplars in the "base" family, estimates shown):
    "opro-v0": {"show_estimates": True, "feedback": False, "exemplar_selection": "random", "num_exemplars": 0},
    # One change at a time, undone from the defaults:
    "opro-estimates": {"show_estimates": True},
    "opro-nofeedback": {"feedback": False, "exemplar_selection": "random"},
    "opro-noexemplars": {"num_exemplars": 0},
    # One change at a time, added to the defaults:
    "opro-minibatch": {"screening": "minibatch"},
}
"""OPRO's settings in each benchmark column (beside the budget, threads and seed every column shares)."""
OPTIMIZERS = ("baseline", *OPRO_VARIANTS, "copro", "mipro", "gepa", "gepa-json")
DEFAULT_OPTIMIZERS = ("baseline", "opro", "copro", "mipro", "gepa")
# The settings that make two results comparable (and a finished run skippable).
RUN_KEY = ("task", "optimizer", "seed", "budget", "train", "val", "test", "task_model", "prompt_model")


# ------------------------------------------------------------------ tasks
@dataclass
class Task:
    name: str
    train: list
    val: list
    test: list
    metric: Callable
    signature: str = "question -> answer"
    initial_instruction: str | None = None


def expand_tasks(names: list[str]) -> list[str]:
    """Task names with ``suite`` replaced by every suite task, duplicates dropped, order kept."""
    expanded = [n for name in names for n in (list(SUITE) if name == "suite" else [name])]
    return list(dict.fromkeys(expanded))


def data_path(data_dir: str | None, dataset: str) -> str | None:
    """``data_dir`` itself, or its ``dataset`` subfolder when it has one (``--data-dir ../shared/data``)."""
    if data_dir is None:
        return None
    sub = Path(data_dir) / dataset
    return str(sub) if sub.is_dir() else data_dir


def load_task(name: str, *, seed: int, n_train: int, n_val: int, n_test: int, data_dir: str | None) -> Task:
    """A suite task, the demo task, ``gsm8k`` or ``bbh:<task>``, split with ``seed``."""
    if name in SUITE:
        suite_task = SUITE[name]
        train, val, test = suite_task.make_splits(n_train, n_val, n_test, seed=seed)
        return Task(name, train, val, test, suite_task.metric, suite_task.signature, suite_task.start)
    if name == "demo":
        from dspy_opro.demo import answer_metric, make_splits

        train, val, test = make_splits(n_train, n_val, n_test, seed=seed)
        return Task(name, train, val, test, answer_metric)
    if name == "gsm8k":
        pool = load_gsm8k("train", data_dir=data_path(data_dir, "gsm8k"))
        test = load_gsm8k("test", data_dir=data_path(data_dir, "gsm8k"))
        train, val = split_examples(pool, [n_train, n_val], seed=seed)
        test = split_examples(test, [n_test], seed=seed)[0]
        return Task(name, train, val, test, gsm8k_metric, initial_instruction="Let's solve the problem.")
    if name.startswith("bbh:"):
        examples = load_bbh(name[4:], data_dir=data_path(data_dir, "bbh"))
        train, val, test = split_examples(examples, [n_train, n_val, n_test], seed=seed)
        return Task(name, train, val, test, bbh_metric, initial_instruction="")
    raise SystemExit(f"unknown task {name!r}: use suite, {', '.join(SUITE)}, demo, gsm8k or bbh:<task name>")


# ------------------------------------------------------------------ models
def role_tagged(setup: ModelSetup) -> ModelSetup:
    """``setup`` with its LMs tagged by role, for the one call meter of a run (`CallCounter` with ``role=None``)."""
    CallCounter.tag(setup.task_lm, "task")
    CallCounter.tag(setup.prompt_lm, "prompt")
    CallCounter.tag(setup.prompt_chat_lm, "prompt")
    return setup


class GEPAProposals:
    """A GEPA callback that counts reflection attempts, proposals and accepted candidates."""

    def __init__(self):
        self.iterations = 0
        self.reflections = 0
        self.proposals: list[str] = []
        self.accepted = 0
        self.rejected = 0
        self.skipped = 0

    def on_iteration_start(self, event):
        self.iterations += 1

    def on_proposal_start(self, event):
        self.reflections += 1

    def on_proposal_end(self, event):
        self.proposals.extend(str(text) for text in event["new_instructions"].values())

    def on_evaluation_skipped(self, event):
        self.skipped += 1

    def on_candidate_accepted(self, event):
        self.accepted += 1

    def on_candidate_rejected(self, event):
        self.rejected += 1

    def details(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "reflections": self.reflections,
            "proposed": len(self.proposals),
            "failed_reflections": self.reflections - len(self.proposals),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "proposals": [text[:200] for text in self.proposals[:12]],
        }


# ------------------------------------------------------------------ runs
def evaluate(program, examples, metric, threads: int) -> float:
    evaluator = dspy.Evaluate(devset=examples, metric=metric, num_threads=threads, display_progress=False)
    return float(evaluator(program).score)


def copro_shape(budget: int, n_train: int) -> tuple[int, int]:
    """(breadth, depth) for COPRO on one predictor: depth 3, 2 or 1, the first with a breadth >= 4 that fits."""
    for depth in (3, 2, 1):
        breadth = budget // (depth * n_train)
        if breadth >= 4:
            return breadth, depth
    return max(2, budget // n_train), 1


def mipro_trials(budget: int, n_val: int) -> tuple[int, int]:
    """(trials, minibatch size) for MIPROv2: minibatches of up to 25 and a full evaluation every 10 trials."""
    minibatch = min(25, n_val)
    return max(2, (budget - 2 * n_val) // (minibatch + n_val // 10 + 1)), minibatch


def opro_details(program, n_train: int) -> dict[str, Any]:
    """What an OPRO run did: steps, candidates (fully scored or screened out), the winner and the last meta-prompt."""
    candidates = list(getattr(program, "candidate_programs", []) or [])
    steps = list(getattr(program, "trial_logs", []) or [])

    def brief(c):
        keys = ("id", "step", "instruction", "score", "evaluated", "val_score")
        return {k: c.get(k) for k in keys}

    ranked = sorted(candidates, key=lambda c: (c.get("evaluated", 0) >= n_train, c.get("score", 0)), reverse=True)
    return {
        "steps": sum(1 for s in steps if s.get("step", 0) > 0),
        "candidates": len(candidates),
        "fully_scored": sum(1 for c in candidates if c.get("evaluated", 0) >= n_train),
        "chosen": brief(candidates[0]) if candidates else None,
        "start": next((brief(c) for c in candidates if c.get("step") == 0), None),
        "top": [brief(c) for c in ranked[:8]],
        "per_step": [
            {"step": s.get("step"), "proposals": s.get("proposals"), "new": len(s.get("new_candidates", []))}
            for s in steps
        ],
        "call_counts": {
            k: v for k, v in (getattr(program, "call_counts", {}) or {}).items() if not isinstance(v, dict)
        },
        "last_meta_prompt": steps[-1].get("meta_prompt", "")[-3000:] if steps else "",
    }


def test_key(task: str, seed: int, args, instructions: list[str]) -> tuple:
    """What a test score depends on: the task's test split, the task model and the program's instructions."""
    return (task, seed, args.train, args.val, args.test, args.task_model, args.cache, tuple(instructions))


def run_one(name: str, task: Task, seed: int, args, models: ModelSetup, test_scores: dict) -> dict[str, Any]:
    """One optimizer on one seed; the result record (test accuracy, calls, tokens, wall time, details).

    ``test_scores`` maps `test_key` to the test scores measured so far; a program whose instructions are
    there is not evaluated again.
    """
    meter = CallCounter(role=None)  # reads each call's role from its LM (`role_tagged`)
    metric = meter.counted(task.metric)
    student = dspy.Predict(task.signature)
    if task.initial_instruction is not None:
        student.signature = student.signature.with_instructions(task.initial_instruction)
    budget, threads, n_train = args.budget, args.threads, len(task.train)
    task_lm, chat_lm = models.task_lm, models.prompt_chat_lm
    details: dict[str, Any] = {}
    start = time.perf_counter()
    with models.context(), meter.context(), contextlib.redirect_stdout(io.StringIO()):
        if name == "baseline":
            program = student
        elif name in OPRO_VARIANTS:
            log_dir = None
            if args.log_dir:
                log_dir = str(Path(args.log_dir) / task.name.replace(":", "_") / f"{name}-seed{seed}")
            build = OPRO.paper_defaults if name == "opro-paper" else OPRO
            program = build(
                metric,
                prompt_model=models.prompt_lm,
                task_model=task_lm,
                meta_prompt=models.meta_prompt,
                max_metric_calls=budget,
                num_threads=threads,
                seed=seed,
                show_progress=False,
                log_dir=log_dir,
                **OPRO_VARIANTS[name],
            ).compile(student, trainset=task.train, valset=task.val)
            details = opro_details(program, n_train)
        elif name == "copro":
            breadth, depth = copro_shape(budget, n_train)
            program = dspy.COPRO(metric=metric, prompt_model=chat_lm, breadth=breadth, depth=depth).compile(
                student, trainset=task.train, eval_kwargs={"num_threads": threads, "display_progress": False}
            )
            evaluated = getattr(program, "candidate_programs", []) or []
            details = {
                "breadth": breadth,
                "depth": depth,
                "distinct_candidates": len(evaluated),
                "top": [{"instruction": c["instruction"], "score": c["score"]} for c in evaluated[:5]],
            }
        elif name == "mipro":
            trials, minibatch = mipro_trials(budget, len(task.val))
            optimizer = dspy.MIPROv2(
                metric=metric,
                prompt_model=chat_lm,
                task_model=task_lm,
                auto=None,
                num_candidates=8,
                max_bootstrapped_demos=0,
                max_labeled_demos=0,
                num_threads=threads,
                seed=seed,
                verbose=False,
            )
            program = optimizer.compile(
                student, trainset=task.train, valset=task.val, num_trials=trials, minibatch_size=minibatch
            )
            proposed = {c["program"].signature.instructions for c in getattr(program, "candidate_programs", []) or []}
            details = {"trials": trials, "minibatch": minibatch, "distinct_instructions_scored": len(proposed)}
        elif name in ("gepa", "gepa-json"):
            program, details = run_gepa(name, student, task, metric, chat_lm, args, seed)
        else:
            raise SystemExit(f"unknown optimizer {name!r}")
    wall = time.perf_counter() - start
    instructions = [p.signature.instructions for _, p in program.named_predictors()]
    # Greedy decoding makes a program's test score a function of its instructions: an optimizer that
    # returns an instruction already tested on this split (often the start) reuses that score.
    known = test_scores.get(test_key(task.name, seed, args, instructions))
    if known is None:
        with models.context():
            known = evaluate(program, task.test, task.metric, threads)
    return {
        "task": task.name,
        "optimizer": name,
        "seed": seed,
        "budget": budget,
        "train": len(task.train),
        "val": len(task.val),
        "test": len(task.test),
        "task_model": args.task_model,
        "prompt_model": args.prompt_model,
        "test_score": known,
        "metric_calls": meter.metric_calls,
        "prompt_calls": meter.calls["prompt"],
        "task_calls": meter.calls["task"],
        "prompt_tokens": meter.tokens["prompt"],
        "task_tokens": meter.tokens["task"],
        "wall_s": round(wall, 1),
        "instructions": instructions,
        "details": details,
        "cache": args.cache,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_gepa(name: str, student, task: Task, metric: Callable, chat_lm, args, seed: int):
    """``dspy.GEPA`` at the budget, instruction-only; returns the program and what its proposer did."""
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    def gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return metric(gold, pred, trace)

    proposer = None
    if name == "gepa" and is_local_model(args.prompt_model):
        from dspy_opro.local import SmallModelAdapter

        proposer = InstructionProposer(adapter=SmallModelAdapter())
    counter = GEPAProposals()
    optimizer = dspy.GEPA(
        metric=gepa_metric,
        max_metric_calls=args.budget,
        reflection_lm=chat_lm,
        instruction_proposer=proposer,
        num_threads=args.threads,
        seed=seed,
        track_stats=True,
        gepa_kwargs={"callbacks": [counter]},
    )
    with contextlib.redirect_stderr(io.StringIO()):  # GEPA always draws a progress bar
        program = optimizer.compile(student, trainset=task.train, valset=task.val)
    details = counter.details()
    result = getattr(program, "detailed_results", None)
    if result is not None:
        details["candidates"] = len(result.candidates)
        details["val_scores"] = [round(100 * s, 1) for s in result.val_aggregate_scores]
    return program, details


# ------------------------------------------------------------------ results file
def run_key(record: dict) -> tuple:
    return tuple(record.get(k) for k in RUN_KEY)


def read_results(path: Path) -> list[dict]:
    """Every record of a results file (none if it does not exist); a torn last line is skipped."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logging.getLogger(__name__).warning("%s line %d is not JSON (an interrupted write?); skipped", path, number)
    return records


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------ reports
def mean_std(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def select(records: list[dict], **settings) -> list[dict]:
    """Records whose settings match (keys of ``RUN_KEY`` other than task, optimizer and seed)."""
    return [r for r in records if all(r.get(k) == v for k, v in settings.items())]


def _columns(records: list[dict], order: tuple[str, ...]) -> tuple[list[str], list[str]]:
    tasks = list(dict.fromkeys(r["task"] for r in records))
    present = {r["optimizer"] for r in records}
    return tasks, [o for o in order if o in present]


def report(records: list[dict]) -> str:
    """Markdown tables: test accuracy (best optimizer in bold), wall time and metric calls per task and optimizer."""
    tasks, optimizers = _columns(records, OPTIMIZERS)
    cells = {(r["task"], r["optimizer"]): [] for r in records}
    for r in records:
        cells[(r["task"], r["optimizer"])].append(r)

    def rows(value: Callable[[dict], float], fmt: str, bold: bool) -> list[str]:
        lines = []
        for task in tasks:
            seeds = {len(cells.get((task, o), [])) for o in optimizers} - {0}
            means = {o: statistics.mean(value(r) for r in cells[(task, o)]) for o in optimizers if (task, o) in cells}
            contenders = [o for o in means if o != "baseline"]
            best = max((means[o] for o in contenders), default=None)
            line = [f"{task} ({'/'.join(map(str, sorted(seeds)))} seed{'s' if max(seeds) > 1 else ''})"]
            for o in optimizers:
                text = mean_std([value(r) for r in cells.get((task, o), [])], fmt)
                if bold and o in contenders and best is not None and means[o] == best:
                    text = f"**{text}**"
                line.append(text)
            lines.append("| " + " | ".join(line) + " |")
        return lines

    header = "| task | " + " | ".join(optimizers) + " |"
    rule = "|---|" + "---:|" * len(optimizers)
    out = ["Held-out test accuracy %, mean ± std over seeds:", "", header, rule]
    out += rows(lambda r: r["test_score"], "{:.1f}", bold=True)
    out += ["", "Wall time per run, s:", "", header, rule]
    out += rows(lambda r: r["wall_s"], "{:.0f}", bold=False)
    out += ["", "Metric calls per run:", "", header, rule]
    out += rows(lambda r: r["metric_calls"], "{:.0f}", bold=False)
    return "\n".join(out)


def plot(records: list[dict], path: str, title: str) -> None:
    """Grouped bars: test accuracy per task and optimizer, with the seed-to-seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, optimizers = _columns(records, OPTIMIZERS)
    width = 0.8 / max(len(optimizers), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(tasks) + 2), 4.5))
    for i, name in enumerate(optimizers):
        means, errors = [], []
        for task in tasks:
            values = [r["test_score"] for r in records if r["task"] == task and r["optimizer"] == name]
            means.append(statistics.mean(values) if values else 0.0)
            errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        positions = [t + (i - (len(optimizers) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(positions, means, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("held-out test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=len(optimizers))
    save_figure(fig, path)


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks",
        "--task",
        nargs="+",
        default=None,
        help="suite, a suite task, demo, gsm8k or bbh:<task> (default: demo; with --report, all in the file)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="the release files (offline): a folder, or one with gsm8k/ bbh/"
    )
    parser.add_argument("--task-model", default="local/smollm2")
    parser.add_argument("--prompt-model", default="local/smollm2")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        choices=OPTIMIZERS,
        help=f"default: {' '.join(DEFAULT_OPTIMIZERS)}; with --report, all in the file",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget", type=int, default=300, help="metric calls per optimizer run")
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--val", type=int, default=20)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", action="store_true", help="use DSPy's cache (wall times then mean little)")
    parser.add_argument("--results", default="runs/optimizers.jsonl", help="JSONL file the runs are appended to")
    parser.add_argument("--log-dir", default=None, help="keep OPRO's run histories (meta-prompts included) here")
    parser.add_argument("--report", action="store_true", help="only print the tables and plot of --results")
    parser.add_argument("--out", default="runs/optimizers.png", help="the plot")
    args = parser.parse_args()
    # DSPy warns at every truncated answer, which a small task model gives often; the table is what matters here.
    logging.getLogger("dspy").setLevel(logging.ERROR)
    logging.getLogger("dspy_opro").setLevel(logging.ERROR)
    path = Path(args.results)
    if args.report:
        everything = read_results(path)
        tasks = expand_tasks(args.tasks) if args.tasks else list(dict.fromkeys(r["task"] for r in everything))
        args.optimizers = args.optimizers or list(OPTIMIZERS)
    else:
        tasks = expand_tasks(args.tasks or ["demo"])
        args.optimizers = args.optimizers or list(DEFAULT_OPTIMIZERS)
    settings = {
        "budget": args.budget,
        "train": args.train,
        "val": args.val,
        "test": args.test,
        "task_model": args.task_model,
        "prompt_model": args.prompt_model,
    }

    if not args.report:
        models = role_tagged(setup_models(args.task_model, args.prompt_model, cache=args.cache))
        previous = read_results(path)
        done = {run_key(r) for r in previous}
        test_scores = {
            test_key(r["task"], r["seed"], args, r["instructions"]): r["test_score"]
            for r in select(previous, **settings)
            if not args.cache and not r.get("cache")
        }
        failed: list[str] = []
        for seed in args.seeds:
            for task_name in tasks:
                todo = [
                    n
                    for n in args.optimizers
                    if run_key({**settings, "task": task_name, "optimizer": n, "seed": seed}) not in done
                ]
                if not todo:
                    continue
                task = load_task(
                    task_name, seed=seed, n_train=args.train, n_val=args.val, n_test=args.test, data_dir=args.data_dir
                )
                for name in todo:
                    try:
                        record = run_one(name, task, seed, args, models, test_scores)
                    except Exception as exc:
                        if classify(exc) == FATAL:  # the set-up is wrong: every other run would fail the same way
                            raise
                        # Not recorded, so a rerun tries it again; the other runs go on.
                        failed.append(f"{task_name} seed {seed} {name}: {describe(exc)}")
                        traceback.print_exc()
                        print(f"FAILED {failed[-1]}", flush=True)
                        continue
                    append_result(path, record)
                    test_scores[test_key(task_name, seed, args, record["instructions"])] = record["test_score"]
                    print(
                        f"{task_name} seed {seed} {name}: test {record['test_score']:.1f}% metric calls "
                        f"{record['metric_calls']} wall {record['wall_s']:.0f}s instructions {record['instructions']}",
                        flush=True,
                    )

    records = [
        r for r in select(read_results(path), **settings) if r["task"] in tasks and r["optimizer"] in args.optimizers
    ]
    if not records:
        raise SystemExit(f"no results in {path} for these settings")
    print(
        f"\nTask model {args.task_model}; prompt model {args.prompt_model}; budget {args.budget} metric calls; "
        f"{args.train}/{args.val}/{args.test} train/val/test; results {path}.\n"
    )
    print(report(records))
    plot(records, args.out, f"{args.budget} metric calls, {args.train}/{args.val}/{args.test}")
    print(f"\nplot: {args.out}")
    if not args.report and failed:
        raise SystemExit(f"{len(failed)} run(s) failed and were not recorded (rerun to retry): " + "; ".join(failed))


if __name__ == "__main__":
    main()
