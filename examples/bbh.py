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
from pathlib import Path

import _common as common

from dspy_opro.tasks import BBH_TASKS, bbh_metric, load_bbh, split_examples

INITIAL_INSTRUCTION = common.EMPTY_INSTRUCTION  # the paper's starting point on BBH
BASELINES = ["Let's think step by step.", INITIAL_INSTRUCTION]
PAPER = (
    "Paper, for orientation (other models, 80% of each task as test): with a PaLM 2-L scorer, OPRO's instructions "
    'beat "Let\'s think step by step." by more than 5 points on 19 of the 23 BBH tasks.',
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=BBH_TASKS, metavar="NAME", help="a BBH task, e.g. navigate")
    parser.add_argument("--program", choices=sorted(common.PROGRAMS), default="cot", help="ChainOfThought or Predict")
    parser.add_argument("--data-dir", default=None, help="folder with the BBH release files <task>.json (offline)")
    parser.add_argument(
        "--train", type=common.size, default=20, help="training examples, count or fraction (paper: 0.2)"
    )
    parser.add_argument("--val", type=common.size, default=20, help="validation examples, count or fraction (0: none)")
    parser.add_argument("--test", type=common.size, default=60, help="test examples, count or fraction (paper: 0.8)")
    parser.add_argument("--steps", type=int, default=3, help="OPRO steps (paper: 200)")
    parser.add_argument("--candidates", type=int, default=8, help="proposals per step (paper: 8)")
    parser.add_argument("--budget", type=int, default=None, help="most metric calls OPRO may spend (validation too)")
    parser.add_argument("--log-dir", default=None, help="keep OPRO's history here; rerunning resumes it")
    parser.add_argument("--out", type=Path, default=None, help="plot path (PNG; default runs/bbh_<task>.png)")
    common.add_initial_argument(parser, "", "the empty instruction")
    common.add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.out = args.out or Path(f"runs/bbh_{args.task}.png")
    return args


def main(argv: list[str] | None = None) -> common.Study:
    args = parse_args(argv)
    common.configure_logging(args.verbose)

    def load():
        examples = load_bbh(args.task, data_dir=args.data_dir)
        return examples, split_examples(examples, [args.train, args.val, args.test], seed=args.seed)

    examples, (train, val, test) = common.exit_on_error(load)
    models = common.load_models(args, max_tokens=common.LOCAL_MAX_TOKENS[args.program])
    print(
        f"BBH {args.task} ({examples[0].kind} answers, {len(examples)} examples): {len(train)} train / {len(val)} val / "
        f"{len(test)} test, seed {args.seed}; program {common.PROGRAM_NAMES[args.program]}; task model "
        f"{args.task_model}; prompt model {args.prompt_model} ({models.family} meta-prompt)",
        flush=True,
    )

    initial = common.initial_instructions(args.initial)
    student = common.make_program(args.program, initial[0])
    optimizer = common.make_opro(
        args,
        models,
        bbh_metric,
        initial,
        task_description=f"{args.task.replace('_', ' ')} (BIG-Bench Hard)",
    )
    title = (
        f"BBH {args.task}, {common.PROGRAM_NAMES[args.program]} on {args.task_model}, OPRO with {args.prompt_model}: "
        f"{len(train)}/{len(val)}/{len(test)} train/val/test, {args.steps} steps x {args.candidates} proposals"
    )
    return common.run_study(
        optimizer,
        student,
        train=train,
        val=val,
        test=test,
        metric=bbh_metric,
        baselines=common.label_baselines(BASELINES, initial),
        make=lambda instruction: common.make_program(args.program, instruction),
        models=models,
        threads=args.threads,
        title=title,
        paper=PAPER,
        out=args.out,
    )


if __name__ == "__main__":
    main()
