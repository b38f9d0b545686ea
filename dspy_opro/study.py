"""Comparing instructions on held-out data: compile with an optimizer, score its choice and the baselines, report.

The demo job, the example scripts and the benchmarks all end the same way: compile the program, then
score the optimizer's instruction beside a few hand-written ones on held-out examples, and print a
table. `compare` does that once::

    from dspy_opro import OPRO, setup_models
    from dspy_opro.study import compare, format_table

    models = setup_models("local/smollm2", "local/smollm2")
    optimizer = OPRO(metric, prompt_model=models.prompt_lm, task_model=models.task_lm, meta_prompt=models.meta_prompt)
    study = compare(optimizer, program, trainset=train, valset=val, testset=test, metric=metric,
                    baselines=[("Let's think step by step.", "baseline")], make_program=make, context=models.context)
    print(format_table(study.rows))

Scores are percentages (0-100), as OPRO reports them. A row's training and validation scores are the
optimizer's own when it scored that instruction, unless the splits are scored again (``rescore``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Row:
    """One instruction's scores (percent); ``None`` where it was not scored.

    Attributes:
        instruction: The instruction.
        source: Where it comes from (``"baseline"``, ``"OPRO, step 3"``, ...).
        test: Its score on the test set.
        train: Its score on the training set.
        val: Its score on the validation set.
    """

    instruction: str
    source: str
    test: float | None = None
    train: float | None = None
    val: float | None = None


@dataclass
class Study:
    """What `compare` measured: one row per instruction (the optimizer's choice last) and the optimizer's records.

    Attributes:
        rows: The rows.
        trajectory: The compiled program's ``trajectory`` (empty when it has none).
        call_counts: The compiled program's ``call_counts`` (empty when it has none).
        seconds: The compile's wall time.
        optimized: The compiled program.
        plot: Where `plot_study` wrote the plot, once it did.
    """

    rows: list[Row]
    trajectory: list[dict[str, Any]]
    call_counts: dict[str, Any]
    seconds: float
    optimized: Any = None
    plot: Path | None = None


def evaluate(program: dspy.Module, examples: Sequence[dspy.Example], metric: Callable, *, num_threads: int) -> float:
    """The score of ``program`` on ``examples``, in percent (run it in the task model's context)."""
    evaluator = dspy.Evaluate(devset=list(examples), metric=metric, num_threads=num_threads, display_progress=False)
    return float(evaluator(program).score)


def describe(instruction: str, width: int | None = None) -> str:
    """An instruction for a table: quoted, ``(empty)`` when blank, shortened to ``width`` characters."""
    text = " ".join(instruction.split())
    if not text:
        return "(empty)"
    if width is not None and len(text) + 2 > width:
        text = text[: width - 5] + "..."
    return f'"{text}"'


def chosen_source(candidate: Mapping[str, Any]) -> str:
    """Where the optimizer's choice comes from: ``"OPRO, step 3"``, or ``"OPRO, kept its start"``."""
    step = candidate.get("step", 0)
    return "OPRO, kept its start" if step == 0 else f"OPRO, step {step}"


def compare(
    optimizer: Any,
    student: dspy.Module,
    *,
    trainset: Sequence[dspy.Example],
    valset: Sequence[dspy.Example],
    testset: Sequence[dspy.Example],
    metric: Callable,
    baselines: Sequence[tuple[str, str]],
    make_program: Callable[[str], dspy.Module],
    context: Callable[[], Any] | None = None,
    num_threads: int = 1,
    rescore: Sequence[str] = ("test",),
    chosen_label: str | None = None,
    echo: Callable[[str], None] | None = print,
) -> Study:
    """Compile ``student``, then score the optimizer's choice and the ``baselines`` (see the module docstring).

    Args:
        optimizer: An OPRO (or any optimizer whose compiled program has OPRO's ``candidate_programs``).
        student: The program.
        trainset: Training examples.
        valset: Validation examples; empty for none (OPRO then keeps its best training score).
        testset: Held-out examples.
        metric: The task metric.
        baselines: ``(instruction, source)`` pairs, e.g. ``("Let's think step by step.", "baseline")``.
        make_program: Builds the program with a given instruction.
        context: A function returning the context to compile and score in (e.g. `ModelSetup.context`).
        num_threads: Parallel calls while scoring.
        rescore: The splits every row is scored on here (the others come from the optimizer's scores).
        chosen_label: The optimizer's row's source; `chosen_source` by default.
        echo: Where each score goes as it is measured; ``None`` for nowhere.

    Returns:
        The rows (baselines first, the optimizer's choice last) and the optimizer's records.
    """
    enter = context or contextlib.nullcontext
    started = time.perf_counter()
    with enter():
        optimized = optimizer.compile(student, trainset=list(trainset), valset=list(valset) or None)
    seconds = time.perf_counter() - started
    candidates = list(getattr(optimized, "candidate_programs", []) or [])
    scored = {c["instruction"]: c for c in reversed(candidates)}  # the best entry of an instruction wins
    chosen = candidates[0] if candidates else {}
    final = chosen.get("instruction") or optimized.predictors()[0].signature.instructions
    data = {"train": trainset, "val": valset, "test": testset}

    def row(program: dspy.Module, instruction: str, source: str, known: Mapping[str, Any]) -> Row:
        scores: dict[str, float | None] = {"train": known.get("score"), "val": known.get("val_score"), "test": None}
        for split in SPLITS:
            if split in rescore and data[split]:
                scores[split] = evaluate(program, data[split], metric, num_threads=num_threads)
                if echo is not None:
                    echo(f"{split} set, {describe(instruction, 60)} ({source}): {scores[split]:.1f}%")
        return Row(instruction, source, scores["test"], scores["train"], scores["val"])

    rows = []
    with enter():
        for instruction, source in baselines:
            rows.append(row(make_program(instruction), instruction, source, scored.get(instruction, {})))
        rows.append(row(optimized, final, chosen_label or chosen_source(chosen), chosen))
    return Study(
        rows,
        list(getattr(optimized, "trajectory", None) or []),
        dict(getattr(optimized, "call_counts", None) or {}),
        seconds,
        optimized,
    )


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def format_table(rows: Sequence[Row], *, width: int = 64) -> str:
    """A markdown table: where each instruction comes from, its train, validation and test scores (%), the instruction."""
    which = max([5, *(len(row.source) for row in rows)])
    lines = [
        f"| {'which':{which}} | train % | val % | test % | instruction |",
        f"|{'-' * (which + 2)}|--------:|------:|-------:|-------------|",
    ]
    for row in rows:
        lines.append(
            f"| {row.source:{which}} | {_cell(row.train):>7} | {_cell(row.val):>5} | {_cell(row.test):>6} "
            f"| {describe(row.instruction, width)} |"
        )
    return "\n".join(lines)


def format_counts(counts: Mapping[str, Any], seconds: float) -> str:
    """OPRO's spending in one line: proposals and what became of them, metric calls, LM calls, time."""
    rejected = sum(counts.get("rejected", {}).values())
    return (
        f"OPRO spent {counts['metric_calls']} metric calls, {counts['task_lm']['calls']} task-model and "
        f"{counts['prompt_lm']['calls']} prompt-model calls (a resumed run counts them all; the time, {seconds:.0f} s, "
        f"is this invocation's). Proposals: {counts['proposals']}, "
        f"of which {counts['unparsed']} held no instruction, {counts['duplicates']} repeated an earlier one and "
        f"{rejected} were rejected (too long, template markup, or the task's filter)."
    )


def plot_study(study: Study, path: str | Path, title: str) -> Path:
    """Test scores per instruction (left) and OPRO's training scores per step (right), as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import draw_scores, draw_trajectory, save_figure

    fig, (bars, steps) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.15, 1]})
    rows = [row for row in study.rows if row.test is not None]
    draw_scores(
        bars, [(describe(row.instruction, 90), row.test, row.source.startswith("OPRO")) for row in rows], wrap=30
    )
    bars.set_title("held-out test set (orange: OPRO's choice)", fontsize=9)
    draw_trajectory(steps, study.trajectory)
    steps.set_title("OPRO trajectory", fontsize=9)
    study.plot = save_figure(fig, path, title=title)
    return study.plot
