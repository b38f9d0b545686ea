"""Swap DSPy's COPRO for OPRO in an existing two-stage pipeline: one line changes.

The pipeline solves arithmetic word problems in two steps, each a predictor with its own instruction: ``extract``
lists the quantities in the problem, ``solve`` answers from the problem and that list. It is compiled twice on the
same training problems, first with ``dspy.COPRO``, then with ``OPRO``; the two runs differ in the optimizer's
constructor line only (see `optimize`), and both return a program whose predictors carry new instructions.

The budgets are matched: COPRO with breadth B and depth D re-scores every candidate of every predictor at every
depth, P x B x D(D+1)/2 programs on the training set for P predictors; OPRO gets B proposals per step and
P x D(D+1)/2 steps, so it scores at most as many. The script prints both programs' instructions, their training and
held-out test accuracy beside the unoptimized pipeline's, the metric calls, LM calls and tokens each optimizer
spent, and its wall time; it writes a plot (default ``runs/swap_optimizer.png``).

    python examples/swap_optimizer.py                       # embedded SmolLM2-135M for both models, offline
    python examples/swap_optimizer.py --task-model openai/gpt-4o-mini --prompt-model openai/gpt-4o-mini

The DSPy cache is off, so both optimizers pay for every call and the wall times compare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import dspy

from dspy_opro import OPRO, ModelSetup
from dspy_opro.counting import CallCounter
from dspy_opro.plots import save_figure
from dspy_opro.study import describe, evaluate
from dspy_opro.tasks.demo import PROBLEM_KINDS, answer_metric, make_splits


# ------------------------------------------------------------------ the pipeline a user already has
class ListQuantities(dspy.Signature):
    """List the quantities given in the problem."""

    question: str = dspy.InputField()
    quantities: str = dspy.OutputField()


class AnswerFromQuantities(dspy.Signature):
    """Solve the problem using the quantities."""

    question: str = dspy.InputField()
    quantities: str = dspy.InputField()
    answer: str = dspy.OutputField()


class WordProblemPipeline(dspy.Module):
    def __init__(self):
        super().__init__()
        self.extract = dspy.Predict(ListQuantities)
        self.solve = dspy.Predict(AnswerFromQuantities)

    def forward(self, question: str) -> dspy.Prediction:
        quantities = self.extract(question=question).quantities
        return self.solve(question=question, quantities=quantities)


# ------------------------------------------------------------------ the swap
def optimize(name: str, program: dspy.Module, trainset: list, metric: Callable, models: ModelSetup, args):
    """Compile ``program`` with COPRO or OPRO: the two branches differ in the constructor line only."""
    n, depth, steps = args.breadth, args.depth, matched_steps(program, args.depth)
    # COPRO prompts through DSPy's adapters, so it gets the chat form of the prompt model; OPRO gets the form its
    # meta-prompt family wants (for a local model: plain text continuation and the "base" family).
    chat_lm, lm, family = models.prompt_chat_lm, models.prompt_lm, models.meta_prompt
    if name == "copro":
        optimizer = dspy.COPRO(metric=metric, prompt_model=chat_lm, breadth=n, depth=depth)
    else:
        optimizer = OPRO(metric=metric, prompt_model=lm, meta_prompt=family, candidates_per_step=n, num_steps=steps)
    return optimizer.compile(program, trainset=trainset)


def matched_steps(program: dspy.Module, depth: int) -> int:
    """OPRO steps that score at most as many programs as COPRO at ``depth`` (see the module docstring)."""
    return len(program.predictors()) * depth * (depth + 1) // 2


# ------------------------------------------------------------------ the comparison
@dataclass
class Outcome:
    """One program: its instructions, scores (percent) and what compiling it cost."""

    name: str
    program: dspy.Module
    test: float
    train: float | None = None
    meter: CallCounter | None = None
    seconds: float | None = None
    changes: list[str] = field(default_factory=list)


def changes(student: dspy.Module, compiled: dspy.Module) -> list[str]:
    """What differs between two programs: predictors, fields, instructions, field prefixes and descriptions."""
    before, after = dict(student.named_predictors()), dict(compiled.named_predictors())
    if list(before) != list(after):
        return [f"predictors {list(before)} -> {list(after)}"]
    found = []
    for name, old in before.items():
        new = after[name]
        if list(old.signature.fields) != list(new.signature.fields):
            found.append(f"fields of {name}")
            continue
        if old.signature.instructions != new.signature.instructions:
            found.append(f"instructions of {name}")
        for key, old_field in old.signature.fields.items():
            old_extra, new_extra = old_field.json_schema_extra or {}, new.signature.fields[key].json_schema_extra or {}
            for attribute in ("prefix", "desc"):
                if old_extra.get(attribute) != new_extra.get(attribute):
                    found.append(f"{attribute} of {name}.{key}")
        if len(old.demos) != len(new.demos):
            found.append(f"demos of {name}")
    return found


def training_score(name: str, compiled: dspy.Module) -> float | None:
    """The training accuracy each optimizer chose its program by (percent)."""
    if name == "opro":
        return compiled.score
    candidates = getattr(compiled, "candidate_programs", None)
    return candidates[0]["score"] if candidates else None


def format_side_by_side(outcomes: list[Outcome]) -> str:
    names = [o.name for o in outcomes]

    def row(label: str, value: Callable[[Outcome], Any], *, spent: bool = True) -> str:
        cells = []
        for outcome in outcomes:
            result = None if spent and outcome.meter is None else value(outcome)
            cells.append("–" if result is None else f"{result:.1f}" if isinstance(result, float) else str(result))
        return f"| {label:26} | " + " | ".join(f"{cell:>9}" for cell in cells) + " |"

    lines = [
        f"| {'':26} | " + " | ".join(f"{name:>9}" for name in names) + " |",
        f"|{'-' * 28}|" + "|".join("-" * 10 + ":" for _ in names) + "|",
        row("test accuracy %", lambda o: o.test, spent=False),
        row("train accuracy %", lambda o: o.train, spent=False),
        row("metric calls", lambda o: o.meter.metric_calls),
        row("prompt-model calls", lambda o: o.meter.calls["prompt"]),
        row("prompt-model completions", lambda o: o.meter.completions["prompt"]),
        row("task-model calls", lambda o: o.meter.calls["task"]),
        row("prompt-model tokens", lambda o: o.meter.tokens["prompt"]),
        row("task-model tokens", lambda o: o.meter.tokens["task"]),
        row("wall time s", lambda o: round(o.seconds)),
    ]
    return "\n".join(lines)


def format_instructions(outcomes: list[Outcome]) -> str:
    lines = []
    for name in dict(outcomes[0].program.named_predictors()):
        lines.append(f"{name}:")
        for outcome in outcomes:
            instruction = dict(outcome.program.named_predictors())[name].signature.instructions
            lines.append(f"  {outcome.name:8} {describe(instruction, 200)}")
    for outcome in outcomes[1:]:
        lines.append(f"{outcome.name} changed: {', '.join(outcome.changes) or 'nothing'}")
    return "\n".join(lines)


def plot(outcomes: list[Outcome], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy, calls) = plt.subplots(1, 2, figsize=(10, 4))
    names = [o.name for o in outcomes]
    accuracy.bar(names, [o.test for o in outcomes], color=["0.6", "#4c72b0", "#dd8452"][: len(outcomes)])
    for x, outcome in enumerate(outcomes):
        accuracy.text(x, outcome.test, f"{outcome.test:.1f}", ha="center", va="bottom", fontsize=8)
    accuracy.set_ylim(0, 100)
    accuracy.set_ylabel("test accuracy (%)")
    compiled = [o for o in outcomes if o.meter is not None]
    labels = [o.name for o in compiled]
    calls.bar(labels, [o.meter.calls["task"] for o in compiled], color="#4c72b0", label="task-model calls")
    calls.bar(
        labels,
        [o.meter.completions["prompt"] for o in compiled],
        bottom=[o.meter.calls["task"] for o in compiled],
        color="#dd8452",
        label="prompt-model completions",
    )
    calls.set_ylabel("LM calls while compiling")
    calls.legend(fontsize=8)
    return save_figure(fig, path, title=title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=15, help="training problems")
    parser.add_argument("--test", type=int, default=60, help="held-out test problems")
    parser.add_argument(
        "--kinds", nargs="+", choices=sorted(PROBLEM_KINDS), default=["groups"], help="kinds of word problem"
    )
    parser.add_argument("--breadth", type=int, default=4, help="COPRO's breadth = OPRO's proposals per step")
    parser.add_argument("--depth", type=int, default=2, help="COPRO's depth (OPRO's steps are matched to it)")
    parser.add_argument("--out", type=Path, default=Path("runs/swap_optimizer.png"), help="plot path (PNG)")
    common.add_model_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Outcome]:
    args = parse_args(argv)
    common.configure_logging(args.verbose)
    train, _, test = make_splits(args.train, 0, args.test, seed=args.seed, kinds=args.kinds)
    models = common.load_models(args, max_tokens=48, cache=False)
    for lm, role in ((models.task_lm, "task"), (models.prompt_lm, "prompt"), (models.prompt_chat_lm, "prompt")):
        CallCounter.tag(lm, role)
    student = WordProblemPipeline()
    print(
        f"Two-stage pipeline {[name for name, _ in student.named_predictors()]} on word problems "
        f"({', '.join(args.kinds)}): {len(train)} train / {len(test)} test, seed {args.seed}; task model "
        f"{args.task_model}; prompt model {args.prompt_model}; COPRO breadth {args.breadth}, depth {args.depth}; "
        f"OPRO {args.breadth} proposals x {matched_steps(student, args.depth)} steps",
        flush=True,
    )

    outcomes = []
    with models.context(), dspy.context(num_threads=args.threads):
        print("test set, unoptimized pipeline: ", end="", flush=True)
        outcomes.append(Outcome("student", student, evaluate(student, test, answer_metric, num_threads=args.threads)))
        print(f"{outcomes[-1].test:.1f}%", flush=True)
        for name in ("copro", "opro"):
            print(f"compiling with {name.upper()} ...", flush=True)
            meter = CallCounter(role=None)  # one meter for both models: each call's role is its LM's tag
            started = time.perf_counter()
            # COPRO prints its prompt model's history to stdout (an eager inspect_history inside a debug log
            # message); keep that out of the report. OPRO's progress bar is on stderr.
            with dspy.context(callbacks=[meter], usage_tracker=meter), contextlib.redirect_stdout(io.StringIO()):
                compiled = optimize(name, student, train, meter.counted(answer_metric), models, args)
            seconds = time.perf_counter() - started
            print(f"test set, {name.upper()} pipeline: ", end="", flush=True)
            accuracy = evaluate(compiled, test, answer_metric, num_threads=args.threads)
            print(f"{accuracy:.1f}%", flush=True)
            outcome = Outcome(
                name.upper(),
                compiled,
                accuracy,
                training_score(name, compiled),
                meter,
                seconds,
                changes(student, compiled),
            )
            outcomes.append(outcome)

    title = f"COPRO vs OPRO on a two-stage pipeline: task model {args.task_model}, prompt model {args.prompt_model}"
    print()
    print(title)
    print(format_side_by_side(outcomes))
    print()
    print(format_instructions(outcomes))
    print(
        "train: the training accuracy each optimizer chose its program by; test: held out. Task-model calls: two per "
        "problem (one per stage). Prompt-model completions: COPRO asks for several per call, OPRO samples one per call."
    )
    path = plot(outcomes, args.out, title)
    print(f"plot: {path}")
    return outcomes


if __name__ == "__main__":
    main()
