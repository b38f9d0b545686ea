"""OPRO against the clock: parallel speed-up with a latency-bound LM, and the optimizer's overhead.

Both models are in-process fakes (`dspy_opro.testing.scripted_lm`) that sleep a fixed time per
call, so wall time is set by the number of calls, their latency and the threads, as with a
remote API. For each thread count the script reports wall time, the calls made, the ideal
time ``calls x latency / threads`` and the achieved fraction of ideal speed-up. The same run
with an instant LM measures what OPRO and DSPy cost on their own (prompt building, adapters,
threads, checkpoints). Part of that is DSPy running the program (adapter formatting and
parsing, under the GIL), which any optimizer pays; the rest is the optimizer's own overhead,
measured as the instant-LM wall time minus the time the same LM calls take when made by a bare
thread pool through DSPy. Both are reported as shares of the latency-bound wall time. DSPy's
COPRO runs under the same conditions for comparison.

    python benchmarks/throughput.py                    # latency 50 ms, threads 1 2 4 8 16
    python benchmarks/throughput.py --latency 0.2 --threads 1 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import re
import tempfile
import threading
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

from dspy_opro import OPRO  # noqa: E402
from dspy_opro.testing import ScriptedCall, ScriptedEngine  # noqa: E402

_QUESTION = re.compile(r"What is (\d+) plus (\d+)\?")
_OUTPUT_FIELDS = re.compile(r"Your output fields are:\n(.*?)\n\n", re.DOTALL)


def make_trainset(n: int) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"What is {a} plus {a + 3}?", answer=str(2 * a + 3)).with_inputs("question")
        for a in range(1, n + 1)
    ]


def metric(example, prediction, trace=None) -> bool:
    return str(prediction.answer).strip() == example.answer


def chat_reply(fields: dict[str, str]) -> str:
    return "\n\n".join(f"[[ ## {k} ## ]]\n{v}" for k, v in fields.items()) + "\n\n[[ ## completed ## ]]"


class World:
    """The scripted task and optimizer models, counting engine calls."""

    def __init__(self, latency: float):
        self.unique = itertools.count()
        self.lock = threading.Lock()
        self.task = ScriptedEngine(self.task_reply, delay=latency)
        self.optimizer = ScriptedEngine(self.optimizer_reply, delay=latency)

    def task_reply(self, call: ScriptedCall) -> str:
        a, b = map(int, _QUESTION.search(call.user).groups())
        right = "number" in call.system.lower() and a % 2 == 0
        return chat_reply({"answer": str(a + b) if right else "unknown"})

    def optimizer_reply(self, call: ScriptedCall) -> str:
        with self.lock:
            k = next(self.unique)
        if "<INS>" in call.user:  # OPRO's meta-prompt
            return f"<INS>Give the number, variant {k}.</INS>"
        fields = _OUTPUT_FIELDS.search(call.system)  # a DSPy signature, e.g. COPRO's
        names = re.findall(r"`(\w+)`", fields.group(1)) if fields else ["answer"]
        return chat_reply({name: f"Give the number, variant {k}." for name in names})

    def lms(self) -> tuple[dspy.LM, dspy.LM]:
        return (
            dspy.LM("scripted/task", engine=self.task, cache=False),
            dspy.LM("scripted/optimizer", engine=self.optimizer, cache=False),
        )


def run_opro(latency: float, threads: int, steps: int, n_train: int) -> tuple[float, int, int]:
    world = World(latency)
    task, optimizer = world.lms()
    with tempfile.TemporaryDirectory() as log_dir:
        start = time.perf_counter()
        OPRO(
            metric,
            prompt_model=optimizer,
            task_model=task,
            num_steps=steps,
            candidates_per_step=8,
            num_threads=threads,
            log_dir=log_dir,
            show_progress=False,
        ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(n_train))
        return time.perf_counter() - start, world.task.calls, world.optimizer.calls


def run_copro(latency: float, threads: int, steps: int, n_train: int) -> tuple[float, int, int]:
    world = World(latency)
    task, optimizer = world.lms()
    start = time.perf_counter()
    with dspy.context(lm=task), contextlib.redirect_stdout(io.StringIO()):  # COPRO prints LM history
        dspy.COPRO(metric=metric, prompt_model=optimizer, breadth=9, depth=steps, init_temperature=1.0).compile(
            dspy.Predict("question -> answer"),
            trainset=make_trainset(n_train),
            eval_kwargs={"num_threads": threads, "display_progress": False},
        )
    return time.perf_counter() - start, world.task.calls, world.optimizer.calls


def run_bare(threads: int, task_calls: int, prompt_calls: int, n_train: int) -> float:
    """The same LM calls made through DSPy by a plain thread pool, with an instant LM."""
    from concurrent.futures import ThreadPoolExecutor

    world = World(0.0)
    task, optimizer = world.lms()
    examples = make_trainset(n_train)
    program = dspy.Predict("question -> answer")

    def one(i: int) -> None:
        if i < task_calls:
            with dspy.context(lm=task):
                metric(examples[i % n_train], program(**examples[i % n_train].inputs()))
        else:
            optimizer("Write an instruction between <INS> and </INS>.")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(task_calls + prompt_calls)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per LM call")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train", type=int, default=32, help="training examples")
    parser.add_argument("--skip-copro", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    optimizers = [("OPRO", run_opro)] + ([] if args.skip_copro else [("COPRO", run_copro)])
    print(
        f"latency {args.latency * 1000:.0f} ms per call, {args.steps} steps, 8 candidates per step, "
        f"{args.train} training examples\n"
    )
    print(
        "| optimizer | threads | LM calls | wall s | ideal s | fraction of ideal speed-up "
        "| instant-LM wall (share) | optimizer's own overhead (share) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in optimizers:
        for threads in args.threads:
            wall, task_calls, prompt_calls = run(args.latency, threads, args.steps, args.train)
            instant, *_ = run(0.0, threads, args.steps, args.train)
            bare = run_bare(threads, task_calls, prompt_calls, args.train)
            calls = task_calls + prompt_calls
            ideal = calls * args.latency / threads
            own = max(0.0, instant - bare)
            print(
                f"| {name} | {threads} | {calls} | {wall:.2f} | {ideal:.2f} | {ideal / wall:.2f} "
                f"| {instant:.2f} s ({100 * instant / wall:.1f}%) | {own:.2f} s ({100 * own / wall:.1f}%) |"
            )


if __name__ == "__main__":
    main()
