"""What an instruction OPRO run is given, checked before any model call: the program, the data, the metric.

Each check raises a clear error saying what is wrong and how to fix it. `program_parts` and
`example_parts` are the data the run's fingerprint is made of, and `describe_program` says
what differs between two programs when a resume is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from .run import differences, digest
from .scoring import MetricError, as_score

logger = logging.getLogger(__name__)

MIN_TRAINSET_SIZE = 3


def check_student(student: Any) -> list[str]:
    """The names of the program's predictors; errors for something that is not a program with predictors."""
    if not isinstance(student, dspy.Module):
        raise TypeError(f"student must be a dspy.Module, got {type(student).__name__}")
    names = [name for name, _ in student.named_predictors()]
    if not names:
        raise ValueError(
            "the program has no predictors (dspy.Predict, dspy.ChainOfThought, ...), so it has no "
            "instructions to optimize"
        )
    return names


def check_examples(name: str, examples: list) -> None:
    """Errors for an empty data set, or one holding something other than examples with inputs marked."""
    if not examples:
        raise ValueError(f"{name} has 0 examples; pass at least one (a few dozen is typical: scores are averages)")
    for i, example in enumerate(examples):
        if not isinstance(example, dspy.Example):
            raise TypeError(f"{name}[{i}] is a {type(example).__name__}, not a dspy.Example")
        if getattr(example, "_input_keys", None) is None:
            raise ValueError(
                f"{name}[{i}] has no input fields marked; build examples as "
                "dspy.Example(question=..., answer=...).with_inputs('question')"
            )


def warn_if_tiny(trainset: list) -> None:
    """A warning that one or two training examples give coarse scores."""
    if len(trainset) < MIN_TRAINSET_SIZE:
        logger.warning(
            "trainset has %d example(s): every score is one of %s, so most instructions will tie; a few dozen "
            "examples tell instructions apart",
            len(trainset),
            " / ".join(f"{100 * k / len(trainset):g}" for k in range(len(trainset) + 1)),
        )


def initial_instructions(spec: Any, predictors: Mapping[str, Any]) -> dict[str, list[str]]:
    """Per predictor, the distinct instructions scored before the first step (see ``OPRO(initial_instructions=...)``)."""
    names = list(predictors)
    current = {name: p.signature.instructions for name, p in predictors.items()}
    if spec is None:
        per_name: dict[str, Any] = {}
    elif isinstance(spec, str) or (isinstance(spec, Sequence) and not isinstance(spec, Mapping)):
        per_name = {name: spec for name in names}
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise ValueError(f"initial_instructions names unknown predictors {unknown}; the program has {names}")
        per_name = dict(spec)
    else:
        raise TypeError("initial_instructions must be None, a string, a list of strings, or a dict of those")
    result = {}
    for name in names:
        given = per_name.get(name, [current[name]])
        given = [given] if isinstance(given, str) else list(given)
        if not given or not all(isinstance(text, str) for text in given):
            raise ValueError(f"initial_instructions for {name!r} must be a non-empty list of strings")
        result[name] = list(dict.fromkeys(given))
    return result


def check_metric(metric: Any, example: dspy.Example) -> None:
    """Call the metric once on a gold prediction: a wrong return type fails before any LM call."""
    labels = example.labels()
    if not len(labels):
        return
    try:
        value = metric(example, dspy.Prediction(**labels.toDict()))
    except Exception as exc:  # metrics may legitimately need fields a gold label lacks
        logger.debug("metric check on a gold prediction raised %r; checking again while scoring", exc)
        return
    try:
        as_score(value)
    except MetricError as exc:
        raise MetricError(f"{exc} (checked on trainset[0] with its own labels as the prediction)") from None


def describe_task(predictor: Any) -> str:
    """A predictor's job in words, for the ``"base"`` meta-prompt: ``given question, produce answer``."""
    signature = predictor.signature
    return f"given {', '.join(signature.input_fields)}, produce {', '.join(signature.output_fields)}"


def program_parts(predictors: Mapping[str, Any]) -> list[tuple[str, list[str], list[str], str]]:
    """The program as the fingerprint sees it: per predictor, its name, fields and instruction."""
    return [
        (name, list(p.signature.input_fields), list(p.signature.output_fields), p.signature.instructions)
        for name, p in predictors.items()
    ]


def example_parts(data: list | None) -> list[tuple[dict, list[str]]] | None:
    """A data set as the fingerprint sees it: per example, its fields and its input names."""
    return None if data is None else [(e.toDict(), sorted(e._input_keys)) for e in data]


def example_digests(data: list | None) -> list[str] | None:
    """A data set in a fingerprint's details: a digest per example (`example_parts`)."""
    parts = example_parts(data)
    return None if parts is None else [digest(part) for part in parts]


def describe_program(key: str, here: Any, saved: Any) -> str:
    """What differs between this program and the saved one (predictors, fields, instructions), for a refusal."""
    if not isinstance(here, list) or not isinstance(saved, list):
        return differences(key, here, saved)
    names_here, names_saved = [p[0] for p in here], [p[0] for p in saved]
    if names_here != names_saved:
        return f" (predictors {names_here} here, {names_saved} in the file)"
    for (name, inputs, outputs, instruction), (_, inputs_s, outputs_s, instruction_s) in zip(here, saved, strict=True):
        if (inputs, outputs) != (inputs_s, outputs_s):
            fields = lambda i, o: f"{', '.join(i)} -> {', '.join(o)}"  # noqa: E731
            return f" (predictor {name!r}: {fields(inputs, outputs)} here, {fields(inputs_s, outputs_s)} in the file)"
        if instruction != instruction_s:
            return f" (predictor {name!r}: instruction {instruction!r} here, {instruction_s!r} in the file)"
    return ""
