"""The demo job, ``python -m dspy_opro demo``: OPRO on the demo task (`dspy_opro.tasks.demo`), offline by default.

It optimizes the instruction of ``dspy.Predict("question -> answer")`` on arithmetic word problems with
the embedded SmolLM2-135M as task model and optimizer (any litellm model strings instead), reports the
starting and final instructions' train, validation and held-out test scores, and writes
``summary.json``, ``trajectory.png`` and the resumable history to the output folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The task is importable from here too, as it was before it moved to dspy_opro.tasks.demo.
from dspy_opro.tasks.demo import (  # noqa: F401
    DEFAULT_KINDS,
    PROBLEM_KINDS,
    TASK_DESCRIPTION,
    TASK_LM_SETTINGS,
    answer_metric,
    evaluate_instruction,
    make_dataset,
    make_problems,
    make_program,
    make_splits,
    task_lm,
)

DEMO_START = "Let's think step by step."
PROMPT_TOKENS = 64  # a proposed instruction is one short line


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
        prompt_model: Model string of the optimizer model.
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
    from dspy_opro.models import setup_models
    from dspy_opro.optimizer import OPRO
    from dspy_opro.plots import plot_trajectory
    from dspy_opro.study import compare, format_table

    out = Path(out_dir)
    train, val, test = make_splits(n_train, n_val, n_test, seed=seed)
    models = setup_models(task_model, prompt_model, proposal_tokens=PROMPT_TOKENS)
    echo(f"Task model {task_model}, prompt model {prompt_model} ({models.meta_prompt} meta-prompt).")
    echo(f"{n_train} training, {n_val} validation and {n_test} test problems, e.g.: {train[0].question}")
    optimizer = OPRO(
        answer_metric,
        prompt_model=models.prompt_lm,
        task_model=models.task_lm,
        num_steps=steps,
        meta_prompt=models.meta_prompt,
        initial_instructions=initial_instruction,
        task_description=TASK_DESCRIPTION,
        num_threads=threads,
        seed=seed,
        screening=screening,
        log_dir=str(out / "history"),
    )
    study = compare(
        optimizer,
        make_program(),
        trainset=train,
        valset=val,
        testset=test,
        metric=answer_metric,
        baselines=[(initial_instruction, "start")],
        make_program=make_program,
        context=models.context,
        num_threads=threads,
        chosen_label="OPRO",
        echo=None,
    )
    optimized = study.optimized
    summary = {
        "task_model": task_model,
        "prompt_model": prompt_model,
        "meta_prompt": models.meta_prompt,
        "seed": seed,
        "rows": [
            {"which": r.source, "instruction": r.instruction, "train": r.train, "val": r.val, "test": r.test}
            for r in study.rows
        ],
        "trajectory": study.trajectory,
        "candidates": [{k: v for k, v in c.items() if k != "program"} for c in optimized.candidate_programs],
        "call_counts": study.call_counts,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    plot_trajectory(study.trajectory, out / "trajectory.png", title="OPRO on the demo task")

    echo("")
    echo(format_table(study.rows))
    counts = study.call_counts
    echo("")
    echo(
        f"{counts['metric_calls']} metric calls, {counts['task_lm']['calls']} task-model and "
        f"{counts['prompt_lm']['calls']} prompt-model calls; {len(optimized.candidate_programs)} instructions scored."
    )
    echo(f"Wrote {out / 'summary.json'}, {out / 'trajectory.png'} and the resumable history in {out / 'history'}.")
    return summary


__all__ = ["DEMO_START", "run_demo"]
