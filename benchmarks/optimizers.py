"""OPRO against DSPy's instruction optimizers, side by side, at an equal metric-call budget.

On the same program, task model, prompt model, training, validation and test sets, this runs
the unoptimized baseline, OPRO (reference defaults: 8 candidates per step, 20 instructions and
3 exemplars shown; as many steps as the budget allows), DSPy's COPRO (breadth 8, depth chosen
to fit the budget) and DSPy's MIPROv2 in instruction-only mode (no demos; trials chosen to fit
the budget). It reports held-out test accuracy, metric calls, prompt-model and task-model LM
calls and tokens, and wall time, as mean ± std over seeds, in a markdown table and a bar plot.

Budgets are matched through each optimizer's own knobs; COPRO and MIPROv2 have no hard cap,
so the metric calls they really made are measured and printed beside OPRO's. ``opro-screening``
(OPRO with minibatch screening) gets only ``--screening-budget`` (default half) of the budget:
the question is whether it reaches the same held-out accuracy with at least 2x fewer calls.

Each optimizer gets the prompt model in the form it works best with: OPRO as chosen by
`dspy_opro.models.optimizer_model` (for a local model, raw text completion and the "base"
meta-prompt family); COPRO and MIPROv2, which prompt through DSPy's adapters, as a chat LM. With
a local task model every program (and COPRO's and MIPROv2's own prompts) runs through
`SmallModelAdapter`, since DSPy's ChatAdapter fails to parse most of a 135M model's replies.

    python benchmarks/optimizers.py --task demo --seeds 0 1 2
    python benchmarks/optimizers.py --task bbh:boolean_expressions --data-dir ../shared/data/bbh
    python benchmarks/optimizers.py --task gsm8k --data-dir ../shared/data/gsm8k --task-model openai/gpt-4o-mini
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
from dspy.utils.callback import BaseCallback  # noqa: E402

from dspy_opro import OPRO  # noqa: E402
from dspy_opro.models import optimizer_model, resolve_lm  # noqa: E402
from dspy_opro.plots import save_figure  # noqa: E402
from dspy_opro.tasks import bbh_metric, gsm8k_metric, load_bbh, load_gsm8k, split_examples  # noqa: E402

OPTIMIZERS = ("baseline", "opro", "opro-screening", "copro", "mipro")


# ------------------------------------------------------------------ tasks
@dataclass
class Task:
    name: str
    train: list
    val: list
    test: list
    metric: Callable
    signature: str = "question -> answer"
    initial_instruction: str | None = None


def load_task(name: str, *, seed: int, n_train: int, n_val: int, n_test: int, data_dir: str | None) -> Task:
    """The demo task, ``gsm8k`` or ``bbh:<task>``, split with ``seed``."""
    if name == "demo":
        from dspy_opro.demo import answer_metric, make_splits

        train, val, test = make_splits(n_train, n_val, n_test, seed=seed)
        return Task(name, train, val, test, answer_metric)
    if name == "gsm8k":
        pool = load_gsm8k("train", data_dir=data_dir)
        test = load_gsm8k("test", data_dir=data_dir)
        train, val = split_examples(pool, [n_train, n_val], seed=seed)
        test = split_examples(test, [n_test], seed=seed)[0]
        return Task(name, train, val, test, gsm8k_metric, initial_instruction="Let's solve the problem.")
    if name.startswith("bbh:"):
        examples = load_bbh(name[4:], data_dir=data_dir)
        train, val, test = split_examples(examples, [n_train, n_val, n_test], seed=seed)
        return Task(name, train, val, test, bbh_metric, initial_instruction="")
    raise SystemExit(f"unknown task {name!r}: use demo, gsm8k or bbh:<task name>")


# ------------------------------------------------------------------ counting
_ROLE = contextvars.ContextVar("benchmark_lm_role", default="other")


class Meter(BaseCallback):
    """Counts metric calls, and LM calls and tokens per role (``prompt`` / ``task``).

    LMs are tagged with a ``_benchmark_role`` attribute, which survives ``lm.copy()``. The
    meter is also the usage tracker; DSPy's parallel executor deep-copies trackers, so a copy
    is this same object.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.metric_calls = 0
        self.calls = {"prompt": 0, "task": 0, "other": 0}
        self.tokens = {"prompt": 0, "task": 0, "other": 0}

    def __deepcopy__(self, memo):
        return self

    def wrap(self, metric: Callable) -> Callable:
        def counted(example, prediction, trace=None):
            with self.lock:
                self.metric_calls += 1
            return metric(example, prediction, trace)

        return counted

    def on_lm_start(self, call_id, instance, inputs):
        role = getattr(instance, "_benchmark_role", "other")
        _ROLE.set(role)
        with self.lock:
            self.calls[role] += 1

    def add_usage(self, lm, usage):
        tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        with self.lock:
            self.tokens[_ROLE.get()] += tokens


# ------------------------------------------------------------------ runs
@dataclass
class Result:
    optimizer: str
    seed: int
    test: float
    metric_calls: int
    prompt_calls: int
    task_calls: int
    prompt_tokens: int
    task_tokens: int
    wall: float
    instructions: list[str] = field(default_factory=list)


def evaluate(program, examples, metric, threads: int) -> float:
    evaluator = dspy.Evaluate(devset=examples, metric=metric, num_threads=threads, display_progress=False)
    return float(evaluator(program).score)


def run_one(name: str, task: Task, seed: int, args, task_lm, prompt_lm, family: str, chat_lm) -> Result:
    """One optimizer on one seed. OPRO gets the prompt model in its meta-prompt family's form (``prompt_lm``);
    COPRO and MIPROv2, which prompt through DSPy's adapters, get the same model as a chat LM (``chat_lm``).
    """
    meter = Meter()
    metric = meter.wrap(task.metric)
    student = dspy.Predict(task.signature)
    if task.initial_instruction is not None:
        student.signature = student.signature.with_instructions(task.initial_instruction)
    budget, threads, n_train = args.budget, args.threads, len(task.train)
    start = time.perf_counter()
    with dspy.context(lm=task_lm, callbacks=[meter], usage_tracker=meter), contextlib.redirect_stdout(io.StringIO()):
        if name == "baseline":
            program = student
        elif name.startswith("opro"):
            program = OPRO(
                metric,
                prompt_model=prompt_lm,
                task_model=task_lm,
                num_steps=10_000,  # the budget decides
                meta_prompt=family,
                max_metric_calls=budget if name == "opro" else int(budget * args.screening_budget),
                num_threads=threads,
                seed=seed,
                screening=name == "opro-screening",
                show_progress=False,
            ).compile(student, trainset=task.train, valset=task.val)
        elif name == "copro":
            # COPRO re-scores every candidate at every depth: breadth x D(D+1)/2 programs for depth D.
            depth = max([1] + [d for d in range(1, 50) if 8 * n_train * d * (d + 1) // 2 <= budget])
            program = dspy.COPRO(metric=metric, prompt_model=chat_lm, breadth=8, depth=depth).compile(
                student, trainset=task.train, eval_kwargs={"num_threads": threads, "display_progress": False}
            )
        elif name == "mipro":
            minibatch = min(25, len(task.val))
            trials = max(2, (budget - 2 * len(task.val)) // (minibatch + len(task.val) // 10 + 1))
            optimizer = dspy.MIPROv2(
                metric=metric,
                prompt_model=chat_lm,
                task_model=task_lm,
                auto=None,
                num_candidates=8,
                max_bootstrapped_demos=0,
                max_labeled_demos=0,
                num_threads=threads,
                seed=seed,
                verbose=False,
            )
            program = optimizer.compile(
                student,
                trainset=task.train,
                valset=task.val,
                num_trials=trials,
                minibatch_size=minibatch,
            )
        else:
            raise SystemExit(f"unknown optimizer {name!r}")
    wall = time.perf_counter() - start
    counts = (meter.metric_calls, meter.calls["prompt"], meter.calls["task"], meter.tokens["prompt"])
    task_tokens = meter.tokens["task"]
    with dspy.context(lm=task_lm):
        test = evaluate(program, task.test, task.metric, threads)
    return Result(
        name,
        seed,
        test,
        *counts,
        task_tokens,
        wall,
        [p.signature.instructions for _, p in program.named_predictors()],
    )


def mean_std(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def report(results: list[Result], args) -> str:
    lines = [
        f"Task {args.task}; task model {args.task_model}; prompt model {args.prompt_model}; budget "
        f"{args.budget} metric calls; {args.train}/{args.val}/{args.test} train/val/test; seeds {args.seeds}.",
        "",
        "| optimizer | test accuracy % | metric calls | prompt-LM calls | task-LM calls | prompt tokens "
        "| task tokens | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.optimizers:
        rows = [r for r in results if r.optimizer == name]
        if not rows:
            continue
        cells = [mean_std([r.test for r in rows])]
        for attr in ("metric_calls", "prompt_calls", "task_calls", "prompt_tokens", "task_tokens", "wall"):
            cells.append(mean_std([float(getattr(r, attr)) for r in rows], "{:.0f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[Result], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in args.optimizers if any(r.optimizer == n for r in results)]
    means = [statistics.mean(r.test for r in results if r.optimizer == n) for n in names]
    errors = [
        statistics.stdev([r.test for r in results if r.optimizer == n]) if len(args.seeds) > 1 else 0.0 for n in names
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, means, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylabel("held-out test accuracy (%)")
    ax.set_title(f"{args.task}: {args.budget} metric calls, {len(args.seeds)} seed(s)")
    save_figure(fig, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="demo", help="demo, gsm8k or bbh:<task>")
    parser.add_argument("--data-dir", default=None, help="directory of the original release files (offline)")
    parser.add_argument("--task-model", default="local/smollm2")
    parser.add_argument("--prompt-model", default="local/smollm2")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget", type=int, default=600, help="metric calls per optimizer run")
    parser.add_argument(
        "--screening-budget", type=float, default=0.5, help="share of the budget given to opro-screening"
    )
    parser.add_argument("--train", type=int, default=30)
    parser.add_argument("--val", type=int, default=30)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", action="store_true", help="use DSPy's cache (wall times then mean little)")
    parser.add_argument("--out", default="runs/optimizers.png")
    args = parser.parse_args()
    # DSPy warns at every truncated answer, which a small task model gives often; the table is what matters here.
    logging.getLogger("dspy").setLevel(logging.ERROR)

    task_lm = resolve_lm(args.task_model, role="task_model")
    if task_lm.model.startswith("local/"):
        from dspy_opro.demo import TASK_LM_SETTINGS
        from dspy_opro.local import SmallModelAdapter, local_lm

        task_lm = local_lm(args.task_model, **TASK_LM_SETTINGS)
        dspy.configure(adapter=SmallModelAdapter())
    task_lm = task_lm.copy(cache=args.cache)
    prompt_lm, family = optimizer_model(args.prompt_model)
    prompt_lm = prompt_lm.copy(cache=args.cache)
    if args.prompt_model.startswith("local/"):
        from dspy_opro.local import local_lm

        chat_lm = local_lm(args.prompt_model, temperature=1.0, max_tokens=256, cache=args.cache)
    else:
        chat_lm = resolve_lm(args.prompt_model, role="prompt_model").copy(cache=args.cache)
    task_lm._benchmark_role, prompt_lm._benchmark_role, chat_lm._benchmark_role = "task", "prompt", "prompt"

    results = []
    for seed in args.seeds:
        task = load_task(
            args.task, seed=seed, n_train=args.train, n_val=args.val, n_test=args.test, data_dir=args.data_dir
        )
        for name in args.optimizers:
            result = run_one(name, task, seed, args, task_lm, prompt_lm, family, chat_lm)
            results.append(result)
            print(
                f"seed {seed} {name}: test {result.test:.1f}% metric calls {result.metric_calls} "
                f"wall {result.wall:.0f}s instructions {result.instructions}",
                flush=True,
            )
    print()
    print(report(results, args))
    plot(results, args)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
