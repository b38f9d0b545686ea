"""OPRO on GSM8K: optimize the instruction of a DSPy math program, then compare it on held-out test questions.

The paper's prompt-optimization setup (Yang et al., 2024, section 5): OPRO starts from "Let's solve the problem.",
scores instructions on a training subset of GSM8K's train split (the paper: 3.5%, 261 questions; here a smaller
seeded subset by default, so a run finishes in minutes on the embedded model), drops proposals that contain digits
(as the reference does on GSM8K), picks among its best instructions on a validation split drawn from the rest of
train, and reports accuracy on questions from GSM8K's test split beside the paper's baselines "Let's think step by
step.", "Let's solve the problem." and the empty instruction. Answers are checked as the paper does: the number
after the last answer marker, else the last number, compared as a number.

The program is ``dspy.ChainOfThought("question -> answer")``; ``--program predict`` uses ``dspy.Predict``, which
suits a tiny model better (it has no reasoning field to fill). The instruction is the signature's instructions.

    python examples/gsm8k.py --program predict --data-dir path/to/gsm8k     # embedded SmolLM2-135M, offline
    python examples/gsm8k.py --task-model openai/gpt-4o-mini --prompt-model openai/gpt-4o --train 261 --steps 20

Data: ``--data-dir`` holds the original release files ``train.jsonl`` and ``test.jsonl``; without it they are
loaded through ``datasets.load_dataset("openai/gsm8k", "main")``. Prints a table, writes a plot (default
``runs/gsm8k.png``) and, with ``--log-dir``, keeps OPRO's history there: the same command resumes an interrupted
run.
"""

from __future__ import annotations

import argparse

import _common as common

from dspy_opro.study import Study
from dspy_opro.tasks import gsm8k_metric, load_gsm8k, split_examples

INITIAL_INSTRUCTION = "Let's solve the problem."  # the paper's starting point on GSM8K
BASELINES = ["Let's think step by step.", INITIAL_INSTRUCTION, common.EMPTY_INSTRUCTION]
PAPER = (
    'Paper, for orientation (GSM8K test, full test set, other models): PaLM 2-L scorer: "Let\'s think step by step." '
    '71.8, OPRO\'s "Take a deep breath and work on this problem step-by-step." 80.2; text-bison scorer: baseline '
    "64.4, OPRO 68.5.",
)


def has_no_digits(instruction: str) -> bool:
    """The reference's GSM8K filter: an instruction holding a number is likely an answer, not an instruction."""
    return not any(character.isdigit() for character in instruction)


def main(argv: list[str] | None = None) -> Study:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    paper = {"train": "paper: 261 from train", "val": "from train; 0: none", "test": "from test"}
    common.add_study_arguments(
        parser,
        data="GSM8K's train.jsonl and test.jsonl",
        paper=paper,
        initial=(INITIAL_INSTRUCTION, f'"{INITIAL_INSTRUCTION}"'),
        out="runs/gsm8k.png",
    )
    args = parser.parse_args(argv)
    common.configure_logging(args.verbose)

    def load():
        train, val = split_examples(load_gsm8k("train", data_dir=args.data_dir), [args.train, args.val], seed=args.seed)
        (test,) = split_examples(load_gsm8k("test", data_dir=args.data_dir), [args.test], seed=args.seed)
        return train, val, test

    return common.run_study(
        args,
        common.exit_on_error(load),
        task="GSM8K",
        metric=gsm8k_metric,
        baselines=BASELINES,
        paper=PAPER,
        instruction_filter=has_no_digits,
        task_description="solving grade-school math word problems",
    )


if __name__ == "__main__":
    main()
