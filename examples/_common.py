"""What the OPRO example scripts share: models, data-size flags, test-set comparison, the table and the plot.

The scripts import it as ``_common`` (Python puts the script's own folder on the import path), so copy this
file along with the script you start from.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

from dspy_opro.demo import TASK_LM_SETTINGS  # noqa: E402
from dspy_opro.local import LocalModelError, SmallModelAdapter, is_local_lm, local_lm  # noqa: E402
from dspy_opro.models import optimizer_model, resolve_lm  # noqa: E402

LOCAL_MODEL = "local/smollm2"

# DSPy replaces an empty instruction ("") with "Given the fields `question`, produce the fields `answer`.";
# a single space leaves the signature's instruction blank, so the task model really sees no instruction
# (SmallModelAdapter then sends no system message). This is the paper's "empty" instruction.
EMPTY_INSTRUCTION = " "

# The task programs of the GSM8K and BBH examples: the same signature, with or without a reasoning field.
PROGRAMS: dict[str, type[dspy.Module]] = {"cot": dspy.ChainOfThought, "predict": dspy.Predict}
PROGRAM_NAMES = {"cot": "ChainOfThought", "predict": "Predict"}
# Longest answer of the local task model per program: a reasoning field needs room.
LOCAL_MAX_TOKENS = {"cot": 256, "predict": 64}


# ------------------------------------------------------------------ command line
def size(text: str) -> int | float:
    """A split size: a count (``20``) or a fraction of the pool (``0.2``)."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count such as 20 or a fraction such as 0.2, got {text!r}"
        ) from None
    if value < 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"a size is a count >= 0 or a fraction in [0, 1], got {text!r}")
    return value


def add_initial_argument(parser: argparse.ArgumentParser, default: str, paper: str) -> None:
    """``--initial``: the instructions OPRO starts from."""
    parser.add_argument(
        "--initial",
        nargs="+",
        default=[default],
        metavar="TEXT",
        help=f'instructions OPRO starts from ("" is the empty instruction; paper: {paper})',
    )


def initial_instructions(texts: Sequence[str]) -> list[str]:
    """``--initial`` values, without repeats; a blank one is `EMPTY_INSTRUCTION`.

    Give them to OPRO as ``initial_instructions``: read back from a program, a blank instruction is "", which
    DSPy would replace by its default sentence.
    """
    return list(dict.fromkeys(text if text.strip() else EMPTY_INSTRUCTION for text in texts))


def label_baselines(baselines: Sequence[str], initial: Sequence[str]) -> list[tuple[str, str]]:
    """``(instruction, source)`` for each baseline, then for each of OPRO's starting instructions not among them."""
    rows = [(text, "baseline, OPRO start" if text in initial else "baseline") for text in baselines]
    return rows + [(text, "OPRO start") for text in initial if text not in baselines]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--task-model``, ``--prompt-model``, ``--seed``, ``--threads`` and ``--verbose``."""
    parser.add_argument(
        "--task-model",
        default=LOCAL_MODEL,
        help="model that runs the program: any litellm model string (default: the embedded SmolLM2-135M)",
    )
    parser.add_argument(
        "--prompt-model",
        default=LOCAL_MODEL,
        help="model that proposes instructions: any litellm model string (default: the embedded SmolLM2-135M)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data splits and of the optimizer")
    parser.add_argument("--threads", type=int, default=2, help="parallel task-model calls")
    parser.add_argument("--verbose", action="store_true", help="log every optimization step")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # DSPy logs every evaluation and every truncated answer; a small model truncates often.
    logging.getLogger("dspy").setLevel(logging.ERROR)
    if verbose:
        logging.getLogger("dspy_opro").setLevel(logging.INFO)


def exit_on_error(action: Callable[[], Any]) -> Any:
    """Run ``action``; a data or model set-up error ends the script with its message instead of a traceback."""
    try:
        return action()
    except (RuntimeError, OSError, ValueError, LocalModelError) as exc:
        raise SystemExit(f"error: {exc}") from None


# ------------------------------------------------------------------ models
@dataclass
class Models:
    """The models of one run.

    Attributes:
        task_lm: Runs the program (greedy: the paper scores instructions at temperature 0).
        adapter: `SmallModelAdapter` for the local task model (DSPy's ChatAdapter fails to parse on a
            135M model), else None (DSPy's default).
        prompt_lm: OPRO's prompt model, in the form its meta-prompt family wants.
        family: OPRO's meta-prompt family: ``"base"`` (a list continued as plain text) for local
            models, ``"chat"`` otherwise.
        prompt_chat_lm: The same prompt model as a chat LM, for optimizers that prompt through DSPy
            adapters (COPRO).
    """

    task_lm: dspy.BaseLM
    adapter: dspy.Adapter | None
    prompt_lm: dspy.BaseLM
    family: str
    prompt_chat_lm: dspy.BaseLM

    def context(self):
        """``dspy.context`` that runs programs on the task model (and adapter)."""
        if self.adapter is None:
            return dspy.context(lm=self.task_lm)
        return dspy.context(lm=self.task_lm, adapter=self.adapter)


def make_models(task_model: str, prompt_model: str, *, max_tokens: int, cache: bool = True) -> Models:
    """Models for litellm model strings; a local task model answers in at most ``max_tokens`` tokens."""
    task_lm = resolve_lm(task_model, role="--task-model")
    adapter = None
    if is_local_lm(task_lm):
        task_lm = local_lm(task_model, **{**TASK_LM_SETTINGS, "max_tokens": max_tokens, "cache": cache})
        adapter = SmallModelAdapter()
    else:
        task_lm = task_lm.copy(temperature=0.0, cache=cache)
    prompt_lm, family = optimizer_model(prompt_model)
    if prompt_model.startswith("local/"):
        chat_lm = local_lm(prompt_model, temperature=1.0, max_tokens=256, cache=cache)
    else:
        chat_lm = resolve_lm(prompt_model, role="--prompt-model")
    return Models(task_lm, adapter, prompt_lm.copy(cache=cache), family, chat_lm.copy(cache=cache))


def load_models(args: argparse.Namespace, *, max_tokens: int, cache: bool = True) -> Models:
    """`make_models` for the script's flags, ending the script with a clear message on a bad model string."""
    return exit_on_error(lambda: make_models(args.task_model, args.prompt_model, max_tokens=max_tokens, cache=cache))


# ------------------------------------------------------------------ programs and scoring
def make_program(kind: str, instruction: str) -> dspy.Module:
    """``ChainOfThought("question -> answer")`` (``"cot"``) or ``Predict`` (``"predict"``) with ``instruction``."""
    return PROGRAMS[kind](dspy.Signature("question -> answer").with_instructions(instruction))


def evaluate(program: dspy.Module, examples: Sequence[dspy.Example], metric: Callable, *, threads: int) -> float:
    """Accuracy of ``program`` on ``examples``, in percent (run it inside `Models.context`)."""
    evaluator = dspy.Evaluate(devset=list(examples), metric=metric, num_threads=threads, display_progress=False)
    return float(evaluator(program).score)


def describe(instruction: str, width: int | None = None) -> str:
    """An instruction for a table: quoted, ``(empty)`` when blank, shortened to ``width`` characters."""
    text = " ".join(instruction.split())
    if not text:
        return "(empty)"
    if width is not None and len(text) + 2 > width:
        text = text[: width - 5] + "..."
    return f'"{text}"'


# ------------------------------------------------------------------ the comparison
@dataclass
class Row:
    """One instruction's scores (percent); train and validation are known for those OPRO scored."""

    instruction: str
    source: str
    test: float
    train: float | None = None
    val: float | None = None


@dataclass
class Study:
    """What an example run measured: one row per instruction (OPRO's choice last) and OPRO's records."""

    rows: list[Row]
    trajectory: list[dict[str, Any]]
    call_counts: dict[str, Any]
    seconds: float
    plot: Path | None = None


def compare_on_test(
    optimized: dspy.Module,
    baselines: Sequence[tuple[str, str]],
    make: Callable[[str], dspy.Module],
    test: Sequence[dspy.Example],
    metric: Callable,
    *,
    models: Models,
    threads: int,
    seconds: float,
) -> Study:
    """Score the baseline instructions and OPRO's optimized program on the test set.

    Args:
        optimized: The program OPRO returned (with ``candidate_programs`` and ``trajectory``).
        baselines: ``(instruction, source)`` pairs, e.g. ``("Let's think step by step.", "baseline")``.
        make: Builds the program with a given instruction.
        test: Held-out examples.
        metric: The task metric.
        models: The run's models.
        threads: Parallel calls.
        seconds: OPRO's wall time, kept in the result.
    """
    scored = {c["instruction"]: c for c in reversed(optimized.candidate_programs)}  # best entry wins
    chosen = optimized.candidate_programs[0]
    rows = []
    with models.context():
        for instruction, source in baselines:
            known = scored.get(instruction, {})
            accuracy = _scored_line(make(instruction), instruction, source, test, metric, threads)
            rows.append(Row(instruction, source, accuracy, known.get("score"), known.get("val_score")))
        accuracy = _scored_line(optimized, chosen["instruction"], "OPRO", test, metric, threads)
    source = "OPRO, kept its start" if chosen["step"] == 0 else f"OPRO, step {chosen['step']}"
    rows.append(Row(chosen["instruction"], source, accuracy, chosen["score"], chosen.get("val_score")))
    return Study(rows, optimized.trajectory, optimized.call_counts, seconds)


def _scored_line(program, instruction, source, test, metric, threads) -> float:
    print(f"test set, {describe(instruction, 60)} ({source}): ", end="", flush=True)
    accuracy = evaluate(program, test, metric, threads=threads)
    print(f"{accuracy:.1f}%", flush=True)
    return accuracy


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def format_table(rows: Sequence[Row], *, width: int = 64) -> str:
    """A markdown table: instruction, where it comes from, train, validation and test accuracy (%)."""
    lines = [
        f"| {'instruction':{width}} | {'source':20} | train % | val % | test % |",
        f"|{'-' * (width + 2)}|{'-' * 22}|--------:|------:|-------:|",
    ]
    for row in rows:
        lines.append(
            f"| {describe(row.instruction, width):{width}} | {row.source:20} | {_cell(row.train):>7} "
            f"| {_cell(row.val):>5} | {_cell(row.test):>6} |"
        )
    return "\n".join(lines)


def format_counts(counts: dict[str, Any], seconds: float) -> str:
    """OPRO's spending in one line: proposals and what became of them, metric calls, LM calls, time."""
    rejected = sum(counts.get("rejected", {}).values())
    return (
        f"OPRO spent {counts['metric_calls']} metric calls, {counts['task_lm']['calls']} task-model and "
        f"{counts['prompt_lm']['calls']} prompt-model calls (a resumed run counts them all; the time, {seconds:.0f} s, "
        f"is this invocation's). Proposals: {counts['proposals']}, "
        f"of which {counts['unparsed']} held no instruction, {counts['duplicates']} repeated an earlier one and "
        f"{rejected} were rejected (too long, template markup, or the task's filter)."
    )


def report(study: Study, *, title: str, paper: Sequence[str]) -> None:
    """Print the table, OPRO's spending and the paper's figures for orientation."""
    chosen = study.rows[-1]
    print()
    print(title)
    print(format_table(study.rows))
    print()
    print(f"OPRO's instruction in full: {describe(chosen.instruction)}")
    print(format_counts(study.call_counts, study.seconds))
    print("train: OPRO's training subset; val: its validation split (chooses among the best five); test: held out.")
    for line in paper:
        print(line)


def make_opro(args: argparse.Namespace, models: Models, metric: Callable, initial: Sequence[str], **extra: Any) -> Any:
    """OPRO configured from the script's flags (steps, proposals, budget, threads, seed, log dir) and models."""
    from dspy_opro import OPRO

    return OPRO(
        metric,
        prompt_model=models.prompt_lm,
        task_model=models.task_lm,
        meta_prompt=models.family,
        initial_instructions=list(initial),
        num_steps=args.steps,
        candidates_per_step=args.candidates,
        max_metric_calls=args.budget,
        num_threads=args.threads,
        seed=args.seed,
        log_dir=args.log_dir,
        **extra,
    )


def run_study(
    optimizer: Any,
    student: dspy.Module,
    *,
    train: Sequence[dspy.Example],
    val: Sequence[dspy.Example],
    test: Sequence[dspy.Example],
    metric: Callable,
    baselines: Sequence[tuple[str, str]],
    make: Callable[[str], dspy.Module],
    models: Models,
    threads: int,
    title: str,
    paper: Sequence[str],
    out: Path,
) -> Study:
    """Compile ``student`` with ``optimizer``, score it and the baselines on ``test``, print the report, plot it.

    An empty ``val`` means no validation split: OPRO then keeps its best training score.
    """
    started = time.perf_counter()
    with models.context():
        optimized = optimizer.compile(student, trainset=train, valset=list(val) or None)
    seconds = time.perf_counter() - started
    study = compare_on_test(optimized, baselines, make, test, metric, models=models, threads=threads, seconds=seconds)
    report(study, title=title, paper=paper)
    study.plot = plot_study(study, out, title)
    print(f"plot: {study.plot}")
    return study


# ------------------------------------------------------------------ the plot
def plot_study(study: Study, path: Path, title: str) -> Path:
    """Test accuracy per instruction (left) and OPRO's training scores per step (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dspy_opro.plots import draw_scores, draw_trajectory, save_figure

    fig, (bars, steps) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.15, 1]})
    draw_scores(
        bars, [(describe(row.instruction, 90), row.test, row.source.startswith("OPRO")) for row in study.rows], wrap=30
    )
    bars.set_title("held-out test set (orange: OPRO's choice)", fontsize=9)
    draw_trajectory(steps, study.trajectory)
    steps.set_title("OPRO trajectory", fontsize=9)
    return save_figure(fig, path, title=title)
