"""OPRO on a BIG-Bench Hard task: optimize the instruction of a DSPy program, then compare it on held-out questions.

The paper's BBH setup (Yang et al., 2024, section 5): for each task, OPRO starts from the empty instruction and
scores instructions on a seeded share of the task's examples (the paper: 20% for training, 80% for test; here
smaller counts by default, so a run finishes in minutes on the embedded model; ``--train 0.2 --val 0 --test 0.8``
gives the paper's split). The held-out accuracy of OPRO's instruction is printed beside the paper's baselines
"Let's think step by step." and the empty instruction. Answers are checked by the kind of task, read from its
targets: multiple choice (the option letter or the option text), boolean (true/yes/valid and false/no/invalid),
numeric (compared as numbers), or free form (the gold answer appears in the reply).

The program is ``dspy.ChainOfThought("question -> answer")``; ``--program predict`` uses ``dspy.Predict``, which
suits a tiny model better. A tiny prompt model shown a blank instruction as the best so far copies the blank
instead of varying it, so with the embedded model start OPRO from a non-empty instruction (``--initial``).

    # the embedded SmolLM2-135M, offline:
    python examples/bbh.py --task boolean_expressions --program predict --initial "Let's think step by step." \\
        --data-dir path/to/bbh
    python examples/bbh.py --task navigate --task-model openai/gpt-4o-mini --prompt-model openai/gpt-4o \\
        --train 0.2 --val 0 --test 0.8 --steps 20

Data: ``--data-dir`` holds the original release files (``<task>.json``); without it the task is loaded through
``datasets.load_dataset("lukaemon/bbh", task)``. Prints a table, writes a plot (default ``runs/bbh_<task>.png``)
and, with ``--log-dir``, keeps OPRO's history there: the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse

import _common as common

from dspy_opro.study import Study
from dspy_opro.tasks import BBH_TASKS, bbh_metric, load_bbh, split_examples

INITIAL_INSTRUCTION = common.EMPTY_INSTRUCTION  # the paper's starting point on BBH
BASELINES = ["Let's think step by step.", INITIAL_INSTRUCTION]
PAPER = (
    "Paper, for orientation (other models, 80% of each task as test): with a PaLM 2-L scorer, OPRO's instructions "
    'beat "Let\'s think step by step." by more than 5 points on 19 of the 23 BBH tasks.',
)


def main(argv: list[str] | None = None) -> Study:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=BBH_TASKS, metavar="NAME", help="a BBH task, e.g. navigate")
    paper = {"train": "paper: 0.2", "val": "0: none", "test": "paper: 0.8"}
    common.add_study_arguments(
        parser, data="the BBH release files <task>.json", paper=paper, initial=("", "the empty instruction"), out=None
    )
    args = parser.parse_args(argv)
    args.out = args.out or f"runs/bbh_{args.task}.png"
    common.configure_logging(args.verbose)

    examples = common.exit_on_error(lambda: load_bbh(args.task, data_dir=args.data_dir))
    data = common.exit_on_error(lambda: split_examples(examples, [args.train, args.val, args.test], seed=args.seed))
    return common.run_study(
        args,
        data,
        task=f"BBH {args.task}",
        about=f"{examples[0].kind} answers, {len(examples)} examples",
        metric=bbh_metric,
        baselines=BASELINES,
        paper=PAPER,
        task_description=f"{args.task.replace('_', ' ')} (BIG-Bench Hard)",
    )


if __name__ == "__main__":
    main()
