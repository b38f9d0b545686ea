"""GSM8K (grade-school math word problems) as DSPy examples, with the paper's numeric checking."""

from __future__ import annotations

import json
from pathlib import Path

import dspy

from ._hub import load_from_hub
from .answers import numbers_equal

HUB_PATH, HUB_CONFIG = "openai/gsm8k", "main"
SPLITS = ("train", "test")


def _example(question: str, solution: str) -> dspy.Example:
    rationale, _, final = solution.rpartition("####")
    return dspy.Example(
        question=question.strip(), answer=final.strip().replace(",", ""), rationale=rationale.strip()
    ).with_inputs("question")


def load_gsm8k(split: str = "train", *, data_dir: str | Path | None = None) -> list[dspy.Example]:
    """Load a GSM8K split.

    Args:
        split: ``"train"`` (7,473 problems) or ``"test"`` (1,319).
        data_dir: A directory with the original release files ``train.jsonl`` / ``test.jsonl``
            (``question`` and ``answer`` ending in ``#### <number>``). Without it the split is
            loaded through ``datasets.load_dataset("openai/gsm8k", "main")``.

    Returns:
        Examples with input ``question``, the final number as ``answer`` (a string) and the
        worked solution as ``rationale``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_dir is None:
        rows = load_from_hub(HUB_PATH, HUB_CONFIG, split, local_hint="with GSM8K's train.jsonl and test.jsonl")
        return [_example(row["question"], row["answer"]) for row in rows]
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {str(data_dir)!r}; expected GSM8K's {split}.jsonl there")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(_example(row["question"], row["answer"]))
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{number} is not a GSM8K record with question and answer: {exc}") from exc
    return examples


def gsm8k_metric(example: dspy.Example, prediction, trace=None) -> bool:
    """The paper's numeric answer checking on ``prediction.answer``."""
    return numbers_equal(str(getattr(prediction, "answer", "") or ""), example.answer)
