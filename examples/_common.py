"""The command line the OPRO example scripts share: flags, logging, errors, and the run of a task study.

The scripts import it as ``_common`` (Python puts the script's own folder on the import path), so copy this
file along with the script you start from. Everything else they use is the package's public API:
`dspy_opro.setup_models` (the models), `dspy_opro.OPRO`, and `dspy_opro.study` (compile, compare with the
baselines on held-out data, print the table, plot).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

from dspy_opro import OPRO, ModelSetup, setup_models  # noqa: E402
from dspy_opro.local import LocalModelError  # noqa: E402
from dspy_opro.study import Study, compare, describe, format_counts, format_table, plot_study  # noqa: E402

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


def add_study_arguments(
    parser: argparse.ArgumentParser, *, data: str, paper: dict[str, str], initial: tuple[str, str], out: str | None
) -> None:
    """The flags of a task study: program, data, split sizes, OPRO's steps and budget, models, output.

    Args:
        parser: The script's parser.
        data: What ``--data-dir`` holds, in words.
        paper: The paper's value of ``train``, ``val`` and ``test``, for the help texts.
        initial: ``--initial``'s default and the paper's starting instruction in words.
        out: The plot's default path (``None``: the script sets it).
    """
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="cot", help="ChainOfThought or Predict")
    parser.add_argument("--data-dir", default=None, help=f"folder with {data} (offline)")
    for name, default in (("train", 20), ("val", 20), ("test", 60)):
        parser.add_argument(
            f"--{name}", type=size, default=default, help=f"{name} examples, count or fraction ({paper[name]})"
        )
    parser.add_argument("--steps", type=int, default=3, help="OPRO steps (paper: 200)")
    parser.add_argument("--candidates", type=int, default=8, help="proposals per step (paper: 8)")
    parser.add_argument("--budget", type=int, default=None, help="most metric calls OPRO may spend (validation too)")
    parser.add_argument("--log-dir", default=None, help="keep OPRO's history here; rerunning resumes it")
    parser.add_argument("--out", type=Path, default=None if out is None else Path(out), help="plot path (PNG)")
    parser.add_argument(
        "--initial",
        nargs="+",
        default=[initial[0]],
        metavar="TEXT",
        help=f'instructions OPRO starts from ("" is the empty instruction; paper: {initial[1]})',
    )
    add_model_arguments(parser)


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
    parser.add_argument("--threads", type=int, default=2, help="parallel model calls")
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


def load_models(args: argparse.Namespace, *, max_tokens: int, cache: bool = True) -> ModelSetup:
    """`dspy_opro.setup_models` for the script's flags, ending the script with a clear message on a bad model string."""
    return exit_on_error(
        lambda: setup_models(args.task_model, args.prompt_model, answer_tokens=max_tokens, cache=cache)
    )


# ------------------------------------------------------------------ a task study
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


def make_program(kind: str, instruction: str) -> dspy.Module:
    """``ChainOfThought("question -> answer")`` (``"cot"``) or ``Predict`` (``"predict"``) with ``instruction``."""
    return PROGRAMS[kind](dspy.Signature("question -> answer").with_instructions(instruction))


def run_study(
    args: argparse.Namespace,
    data: tuple[list, list, list],
    *,
    task: str,
    metric: Callable,
    baselines: Sequence[str],
    paper: Sequence[str],
    about: str = "",
    **opro: Any,
) -> Study:
    """OPRO from the flags on ``data`` (train, val, test), then `dspy_opro.study.compare` with the baselines:
    prints the table, OPRO's spending and the paper's figures, writes the plot."""
    train, val, test = data
    models = load_models(args, max_tokens=LOCAL_MAX_TOKENS[args.program])
    program = PROGRAM_NAMES[args.program]
    print(
        f"{task}{f' ({about})' if about else ''}: {len(train)} train / {len(val)} val / {len(test)} test, seed "
        f"{args.seed}; program {program}; "
        f"task model {args.task_model}; prompt model {args.prompt_model} ({models.meta_prompt} meta-prompt)",
        flush=True,
    )
    initial = initial_instructions(args.initial)
    optimizer = OPRO(
        metric,
        prompt_model=models.prompt_lm,
        task_model=models.task_lm,
        meta_prompt=models.meta_prompt,
        initial_instructions=initial,
        num_steps=args.steps,
        candidates_per_step=args.candidates,
        max_metric_calls=args.budget,
        num_threads=args.threads,
        seed=args.seed,
        log_dir=args.log_dir,
        **opro,
    )
    study = compare(
        optimizer,
        make_program(args.program, initial[0]),
        trainset=train,
        valset=val,
        testset=test,
        metric=metric,
        baselines=label_baselines(baselines, initial),
        make_program=lambda instruction: make_program(args.program, instruction),
        context=models.context,
        num_threads=args.threads,
        echo=lambda line: print(line, flush=True),
    )
    title = (
        f"{task}, {program} on {args.task_model}, OPRO with {args.prompt_model}: "
        f"{len(train)}/{len(val)}/{len(test)} train/val/test, {args.steps} steps x {args.candidates} proposals"
    )
    print(f"\n{title}\n{format_table(study.rows)}\n")
    print(f"OPRO's instruction in full: {describe(study.rows[-1].instruction)}")
    print(format_counts(study.call_counts, study.seconds))
    print("train: OPRO's training subset; val: its validation split (chooses among the best five); test: held out.")
    for line in paper:
        print(line)
    print(f"plot: {plot_study(study, args.out, title)}")
    return study


# ------------------------------------------------------------------ numeric OPRO
def add_numeric_arguments(parser: argparse.ArgumentParser, *, steps: int, out: str) -> None:
    """The flags of a numeric OPRO script: the prompt model and its meta-prompt family, steps, proposals, output."""
    parser.add_argument("--prompt-model", default=LOCAL_MODEL, help="litellm model string (default: SmolLM2-135M)")
    parser.add_argument(
        "--meta-prompt",
        choices=["auto", "chat", "base"],
        default="auto",
        help="meta-prompt family; auto: 'base' (list completion) for local models, 'chat' (the paper's wording) "
        "otherwise",
    )
    parser.add_argument("--steps", type=int, default=steps, help="most optimization steps")
    parser.add_argument("--proposals", type=int, default=8, help="proposals sampled per step (the paper: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the problem and the samples")
    parser.add_argument("--threads", type=int, default=2, help="parallel samples")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep a resumable JSON history here")
    parser.add_argument("--out", type=Path, default=Path(out), help="plot path (PNG)")
    parser.add_argument("--verbose", action="store_true", help="log every step")


def numeric_prompt_model(args: argparse.Namespace, *, base_tokens: int, chat_tokens: int) -> tuple[dspy.BaseLM, str]:
    """The prompt model for the flags, and its family: a ``"base"`` reply continues one line of ``base_tokens``."""
    models = exit_on_error(
        lambda: setup_models(prompt_model=args.prompt_model, meta_prompt=args.meta_prompt, proposal_tokens=chat_tokens)
    )
    lm = models.prompt_lm if models.meta_prompt != "base" else models.prompt_lm.copy(max_tokens=base_tokens)
    return lm, models.meta_prompt
