"""The demo task: arithmetic word problems, generated in code, for a small local model.

Each problem is one short story with small whole numbers and one operation. The default kind is
equal groups, e.g. "There are 4 tables with 7 chairs at each table. How many chairs are there in
total?" (gold answer 28); `PROBLEM_KINDS` also has boxes (multiplication), addition and
subtraction. `make_dataset` draws problems deterministically from a seed; `make_splits` draws disjoint
train/validation/test sets. The program is ``dspy.Predict("question -> answer")``; its
instruction (the signature's instructions, sent as the system message by `SmallModelAdapter`)
is what an instruction optimizer changes. `answer_metric` reads the number in the reply the way
the OPRO reference does (after the last answer marker, else the last number) and compares it
with the gold answer.

Why this task: on SmolLM2-135M-Instruct the instruction changes accuracy a lot, so an instruction
optimizer has a real signal to climb. Accuracy on the same 40 problems
(``make_dataset(40, seed=0)``, greedy decoding, max_tokens 48, `SmallModelAdapter`; measured with
``python benchmarks/local_model.py --only accuracy``)::

     6/40  "Let's think step by step."
     6/40  "Solve the math word problem."
    11/40  "Math problem to solve."
    14/40  "Answer with just the number."
    16/40  ""  (DSPy's default instruction, see below)
    17/40  "Answer the question."
    17/40  "Compute the answer and write only the final number."
    19/40  " "  (blank: no system message)
    20/40  "Answer the question with the appropriate answer."

A blank instruction leaves the system message out, so the model sees its own default system
prompt; DSPy replaces an empty instruction with "Given the fields `question`, produce the fields
`answer`." before the adapter sees it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dspy

from dspy_opro.tasks.answers import numbers_equal

logger = logging.getLogger(__name__)

TASK_DESCRIPTION = "solving arithmetic word problems"

NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Noah", "Zoe", "Max", "Ella")
ITEMS = ("apples", "marbles", "stickers", "cookies", "pencils", "books", "cards", "shells", "coins", "toys")
# (what is counted, the group it comes in): "There are 4 tables with 6 chairs at each table."
GROUPS = (
    ("chairs", "table"),
    ("students", "row"),
    ("flowers", "pot"),
    ("eggs", "basket"),
    ("apples", "bag"),
    ("books", "shelf"),
    ("cookies", "plate"),
    ("pencils", "box"),
)


def _groups(rng: random.Random) -> tuple[str, int]:
    thing, group = rng.choice(GROUPS)
    count, each = rng.randint(2, 9), rng.randint(2, 9)
    plural = "shelves" if group == "shelf" else "boxes" if group == "box" else f"{group}s"
    question = f"There are {count} {plural} with {each} {thing} at each {group}. How many {thing} are there in total?"
    return question, count * each


def _boxes(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, each = rng.randint(2, 9), rng.randint(2, 9)
    question = f"{name} buys {boxes} boxes of {item}. Each box holds {each} {item}. How many {item} does {name} buy?"
    return question, boxes * each


def _add(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, more = rng.randint(1, 9), rng.randint(1, 9)
    question = f"{name} has {have} {item}. {name} gets {more} more {item}. How many {item} does {name} have now?"
    return question, have + more


def _subtract(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have = rng.randint(5, 12)
    gone = rng.randint(1, have - 1)
    question = f"{name} has {have} {item}. {name} gives {gone} of them away. How many {item} are left?"
    return question, have - gone


PROBLEM_KINDS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "groups": _groups,
    "boxes": _boxes,
    "add": _add,
    "subtract": _subtract,
}
# Equal groups: the kind on which SmolLM2-135M's accuracy moves most with the instruction.
DEFAULT_KINDS = ("groups",)


def make_problems(n: int, seed: int = 0, *, kinds: Sequence[str] = DEFAULT_KINDS) -> list[tuple[str, int]]:
    """``n`` distinct (question, answer) pairs, the same for the same arguments.

    Args:
        n: How many problems.
        seed: Random seed.
        kinds: Problem kinds to draw from, uniformly (see `PROBLEM_KINDS`).

    Returns:
        The problems, each a question and its whole-number answer.
    """
    unknown = [kind for kind in kinds if kind not in PROBLEM_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {sorted(PROBLEM_KINDS)}, got {list(kinds)}")
    rng = random.Random(seed)
    problems: list[tuple[str, int]] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"Could not draw {n} distinct problems of kinds {list(kinds)}")
        question, answer = PROBLEM_KINDS[rng.choice(list(kinds))](rng)
        if question not in seen:
            seen.add(question)
            problems.append((question, answer))
    return problems


def make_dataset(n: int, seed: int = 0, *, kinds: Sequence[str] = DEFAULT_KINDS) -> list[dspy.Example]:
    """``n`` distinct problems as DSPy examples with input ``question`` and label ``answer`` (a string).

    Args:
        n: How many examples.
        seed: Random seed; the same seed gives the same examples.
        kinds: Problem kinds (see `PROBLEM_KINDS`).

    Returns:
        The examples.
    """
    return [
        dspy.Example(question=question, answer=str(answer)).with_inputs("question")
        for question, answer in make_problems(n, seed, kinds=kinds)
    ]


def make_splits(
    n_train: int, n_val: int, n_test: int = 0, seed: int = 0, *, kinds: Sequence[str] = DEFAULT_KINDS
) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    """Disjoint train, validation and test sets, drawn from one seeded stream.

    Args:
        n_train: Training examples.
        n_val: Validation examples.
        n_test: Test examples.
        seed: Random seed.
        kinds: Problem kinds (see `PROBLEM_KINDS`).

    Returns:
        ``(train, val, test)``; no question appears in two of them.
    """
    examples = make_dataset(n_train + n_val + n_test, seed, kinds=kinds)
    return examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :]


def answer_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> float:
    """1.0 when the predicted number equals the gold answer, else 0.0 (DSPy metric signature).

    The number is read the way the OPRO reference reads it (`dspy_opro.tasks.extract_number`):
    the first number after the last answer marker, else the last number in the reply.

    Args:
        example: An example from `make_dataset`.
        prediction: The program's prediction (its ``answer`` field), or the answer text itself.
        trace: Unused (DSPy passes it while bootstrapping).

    Returns:
        1.0 or 0.0.
    """
    predicted = getattr(prediction, "answer", prediction)
    return float(numbers_equal("" if predicted is None else str(predicted), example.answer))


def make_program(instructions: str | None = None) -> dspy.Predict:
    """The demo program, ``dspy.Predict("question -> answer")``, optionally with given instructions.

    Args:
        instructions: The signature's instructions; None keeps DSPy's default.

    Returns:
        A fresh program.
    """
    signature = dspy.Signature("question -> answer")
    if instructions is not None:
        signature = signature.with_instructions(instructions)
    return dspy.Predict(signature)


TASK_LM_SETTINGS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 48}


def task_lm(**overrides: Any) -> dspy.LM:
    """The local model set up as the demo's task model (greedy decoding, short answers).

    Args:
        **overrides: ``dspy.LM`` settings replacing `TASK_LM_SETTINGS`.

    Returns:
        The LM (``local/smollm2``).
    """
    from dspy_opro.local import local_lm

    return local_lm(**{**TASK_LM_SETTINGS, **overrides})


def evaluate_instruction(
    instructions: str | None,
    dataset: Sequence[dspy.Example],
    *,
    lm: Any = None,
    adapter: Any = None,
    num_threads: int = 1,
) -> float:
    """Accuracy (0 to 1) of the demo program with these instructions on ``dataset``.

    Args:
        instructions: The instruction to score (None: DSPy's default).
        dataset: Examples from `make_dataset`.
        lm: The task model; default `task_lm`.
        adapter: The adapter; default `SmallModelAdapter`.
        num_threads: Threads for ``dspy.Evaluate``.

    Returns:
        The fraction of examples answered correctly.
    """
    from dspy_opro.local import SmallModelAdapter

    evaluate = dspy.Evaluate(
        devset=list(dataset), metric=answer_metric, num_threads=num_threads, display_progress=False, max_errors=0
    )
    with dspy.context(lm=lm or task_lm(), adapter=adapter or SmallModelAdapter()):
        result = evaluate(make_program(instructions))
    return result.score / 100.0


# --------------------------------------------------------------------------- the demo job
DEMO_START = "Let's think step by step."


def _task_setup(task_model: str) -> tuple[dspy.BaseLM, Any]:
    """The task LM for a model string and the adapter to run it with (None: DSPy's default)."""
    from dspy_opro.local import SmallModelAdapter
    from dspy_opro.models import resolve_lm

    if task_model.startswith("local/"):
        return task_lm(model=task_model), SmallModelAdapter()
    return resolve_lm(task_model, role="task_model").copy(**TASK_LM_SETTINGS), None


def plot_trajectory(program: dspy.Module, path: str | Path, *, title: str = "OPRO on the demo task") -> None:
    """Write a PNG of the training score per step: every candidate as a dot, the best as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dspy_opro.plots import draw_trajectory, save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_trajectory(ax, program.trajectory)
    ax.set_title(title)
    save_figure(fig, path)


def run_demo(
    *,
    task_model: str = "local/smollm2",
    prompt_model: str = "local/smollm2",
    steps: int = 5,
    n_train: int = 20,
    n_val: int = 20,
    n_test: int = 60,
    seed: int = 0,
    threads: int = 2,
    screening: bool = True,
    initial_instruction: str = DEMO_START,
    out_dir: str | Path = "runs/demo",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Optimize the demo program's instruction with OPRO and report train, validation and test scores.

    Args:
        task_model: Model string of the model that answers the problems.
        prompt_model: Model string of the optimizer model (see `dspy_opro.models.optimizer_model`).
        steps: OPRO steps.
        n_train: Training problems (scored for every candidate).
        n_val: Validation problems (choose among the best candidates).
        n_test: Held-out test problems (reported only).
        seed: Seeds the problems and the run.
        threads: Threads for scoring and sampling.
        screening: Score new candidates on growing minibatches (see `dspy_opro.screening`).
        initial_instruction: The instruction OPRO starts from.
        out_dir: Where the history (resumable), the trajectory JSON and the plot are written.
        echo: Where the report lines go.

    Returns:
        The summary that is also written to ``out_dir/summary.json``.
    """
    from dspy_opro.models import optimizer_model
    from dspy_opro.optimizer import OPRO

    out = Path(out_dir)
    train, val, test = make_splits(n_train, n_val, n_test, seed=seed)
    lm, adapter = _task_setup(task_model)
    prompt_lm, family = optimizer_model(prompt_model, max_tokens=64)
    echo(f"Task model {task_model}, prompt model {prompt_model} ({family} meta-prompt).")
    echo(f"{n_train} training, {n_val} validation and {n_test} test problems, e.g.: {train[0].question}")
    with dspy.context(adapter=adapter):
        optimized = OPRO(
            answer_metric,
            prompt_model=prompt_lm,
            task_model=lm,
            num_steps=steps,
            meta_prompt=family,
            initial_instructions=initial_instruction,
            task_description=TASK_DESCRIPTION,
            num_threads=threads,
            seed=seed,
            screening=screening,
            log_dir=str(out / "history"),
        ).compile(make_program(), trainset=train, valset=val)
        final = optimized.signature.instructions
        evaluate = dspy.Evaluate(devset=test, metric=answer_metric, num_threads=threads, display_progress=False)
        with dspy.context(lm=lm):
            test_scores = {text: float(evaluate(make_program(text)).score) for text in {initial_instruction, final}}
    by_text = {c["instruction"]: c for c in optimized.candidate_programs if c["evaluated"] == n_train}
    rows = []
    for label, text in (("start", initial_instruction), ("OPRO", final)):
        candidate = by_text.get(text, {})
        rows.append((label, text, candidate.get("score"), candidate.get("val_score"), test_scores[text]))
    summary = {
        "task_model": task_model,
        "prompt_model": prompt_model,
        "meta_prompt": family,
        "seed": seed,
        "rows": [dict(zip(("which", "instruction", "train", "val", "test"), row, strict=True)) for row in rows],
        "trajectory": optimized.trajectory,
        "candidates": [{k: v for k, v in c.items() if k != "program"} for c in optimized.candidate_programs],
        "call_counts": optimized.call_counts,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    plot_trajectory(optimized, out / "trajectory.png")

    fmt = lambda v: "  -  " if v is None else f"{v:5.1f}"  # noqa: E731
    echo("")
    echo(f"| {'':5} | {'train %':>7} | {'val %':>6} | {'test %':>6} | instruction")
    echo(f"|{'-' * 7}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 12}")
    for label, text, tr, va, te in rows:
        echo(f"| {label:5} | {fmt(tr):>7} | {fmt(va):>6} | {fmt(te):>6} | {text!r}")
    counts = optimized.call_counts
    echo("")
    echo(
        f"{counts['metric_calls']} metric calls, {counts['task_lm']['calls']} task-model and "
        f"{counts['prompt_lm']['calls']} prompt-model calls; {len(optimized.candidate_programs)} instructions scored."
    )
    echo(f"Wrote {out / 'summary.json'}, {out / 'trajectory.png'} and the resumable history in {out / 'history'}.")
    return summary
