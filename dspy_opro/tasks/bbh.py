"""BIG-Bench Hard tasks as DSPy examples, with answer checking by kind of task."""

from __future__ import annotations

import json
from pathlib import Path

import dspy

from ._hub import load_from_hub
from .answers import answers_match, extract_number, is_boolean_answer

HUB_PATH = "lukaemon/bbh"

# The 27 tasks of the BBH release.
BBH_TASKS = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)


def bbh_kind(targets: list[str]) -> str:
    """``"multiple_choice"``, ``"boolean"``, ``"numeric"`` or ``"free_form"``, from a task's targets."""
    targets = [str(t).strip() for t in targets]
    if targets and all(t.startswith("(") and t.endswith(")") and len(t) == 3 for t in targets):
        return "multiple_choice"
    if targets and all(is_boolean_answer(t) for t in targets):
        return "boolean"
    if targets and all(extract_number(t) is not None and t.lstrip("-").replace(".", "").isdigit() for t in targets):
        return "numeric"
    return "free_form"


def load_bbh(task: str, *, data_dir: str | Path | None = None) -> list[dspy.Example]:
    """Load one BBH task.

    Args:
        task: A name from `BBH_TASKS`, e.g. ``"boolean_expressions"``.
        data_dir: A directory with the original release files (``<task>.json`` holding
            ``examples`` with ``input`` and ``target``). Without it the task is loaded through
            ``datasets.load_dataset("lukaemon/bbh", task, split="test")``.

    Returns:
        Examples with input ``question``, the gold ``answer`` and the task's ``kind``.
    """
    if task not in BBH_TASKS:
        raise ValueError(f"unknown BBH task {task!r}; choose one of: {', '.join(BBH_TASKS)}")
    if data_dir is None:
        rows = list(load_from_hub(HUB_PATH, task, "test", local_hint=f"with the BBH file {task}.json"))
    else:
        path = Path(data_dir) / f"{task}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {str(data_dir)!r}; expected the BBH release file there")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path} is not a BBH task file with an 'examples' list: {exc}") from exc
    kind = bbh_kind([row["target"] for row in rows])
    return [
        dspy.Example(question=row["input"], answer=str(row["target"]), kind=kind).with_inputs("question")
        for row in rows
    ]


def bbh_metric(example: dspy.Example, prediction, trace=None) -> bool:
    """Answer checking for the example's kind of task (see `dspy_opro.tasks.answers`)."""
    answer = str(getattr(prediction, "answer", "") or "")
    return answers_match(answer, example.answer, kind=example.kind, question=example.question)
