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
optimizer has a real signal to climb (the README gives the accuracy of hand-written instructions,
measured with ``python benchmarks/local_model.py --only accuracy``).

A blank instruction leaves the system message out, so the model sees its own default system
prompt; DSPy replaces an empty instruction with "Given the fields `question`, produce the fields
`answer`." before the adapter sees it.

The demo job that optimizes this program is `dspy_opro.demo` (``python -m dspy_opro demo``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import dspy

from dspy_opro.models import LOCAL_TASK_SETTINGS
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


TASK_LM_SETTINGS = LOCAL_TASK_SETTINGS  # the model-setup policy's: greedy decoding, short answers


def task_lm(**overrides: Any) -> dspy.LM:
    """The local model set up as the demo's task model (`dspy_opro.models.LOCAL_TASK_SETTINGS`).

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
