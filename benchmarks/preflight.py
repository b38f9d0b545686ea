"""How fast a model that cannot work stops OPRO, and what reaches the provider before it does.

Each case builds OPRO with one broken model (the other a scripted in-process model) and calls
``compile`` on six examples; the table gives the error, the seconds from ``compile`` to the error
over ``--repeats`` runs (median and slowest: the first run of a process also imports litellm), the requests the loopback OpenAI-compatible server (tests/openai_server.py,
real HTTP on 127.0.0.1) received, and the metric calls made on a model's prediction. Nothing
leaves the machine.

    python benchmarks/preflight.py
    python benchmarks/preflight.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dspy  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402
from opro_scripted import ScriptedOptimizer, make_trainset, metric, task_lm  # noqa: E402

from dspy_opro import OPRO  # noqa: E402


class ModelPredictionMetric:
    """The task's metric, counting calls on a model's prediction (not the set-up check on gold labels)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, example, prediction, trace=None):
        self.calls += prediction._completions is not None
        return metric(example, prediction)


def cases(server: OpenAIServer):
    base = {"api_base": server.url, "cache": False}
    yield "missing key, model string 'openai/gpt-4o-mini'", lambda: {"prompt_model": "openai/gpt-4o-mini"}
    yield "missing key, dspy.LM with api_base", lambda: {"task_model": dspy.LM("openai/good-model", **base)}
    yield (
        "missing key, dspy.LM(engine='litellm')",
        lambda: {"prompt_model": dspy.LM("openai/gpt-4o-mini", engine="litellm", cache=False)},
    )
    yield (
        "wrong key (HTTP 401), task model",
        lambda: {"task_model": dspy.LM("openai/good-model", api_key="sk-wrong", **base)},
    )
    yield (
        "unknown model (HTTP 404), prompt model",
        lambda: {"prompt_model": dspy.LM("openai/no-such-model", api_key="sk-right", **base)},
    )
    yield "unknown model string 'nonsense/x'", lambda: {"prompt_model": "nonsense/x"}


def run_case(server: OpenAIServer, build) -> tuple[str, float, int, int]:
    before = server.count()
    score = ModelPredictionMetric()
    started = time.monotonic()
    try:
        models = {"prompt_model": ScriptedOptimizer().lm(), "task_model": task_lm(), **build()}
        OPRO(score, show_progress=False, **models).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(6)
        )
        error = "no error"
    except Exception as exc:
        error = type(exc).__name__
    return error, time.monotonic() - started, server.count() - before, score.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.pop("OPENAI_API_KEY", None)
    with OpenAIServer(lambda request: "OK", api_key="sk-right", models=("good-model",)) as server:
        print("| case | error | seconds to error: median (slowest) | requests to the server | metric calls |")
        print("|---|---|---:|---:|---:|")
        for label, build in cases(server):
            runs = [run_case(server, build) for _ in range(args.repeats)]
            errors = {r[0] for r in runs}
            seconds = [r[1] for r in runs]
            print(
                f"| {label} | {', '.join(sorted(errors))} | {statistics.median(seconds):.2f} ({max(seconds):.2f}) | "
                f"{max(r[2] for r in runs)} | "
                f"{max(r[3] for r in runs)} |"
            )


if __name__ == "__main__":
    main()
