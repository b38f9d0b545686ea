"""Measure the embedded local model: latency, parse failures, lock vs pool, instruction accuracy.

    python benchmarks/local_model.py                      # everything (about 10 minutes on 2 cores)
    python benchmarks/local_model.py --only latency,threads
    python benchmarks/local_model.py --json results.json  # also save the numbers

Sections:

- ``latency``: per-call latency (median, p95) of the same chat requests, the demo task's
  prompts as `SmallModelAdapter` formats them, through ``litellm.completion`` and through
  ``dspy.LM`` (cache off), and of raw text completions through `text_lm`.
- ``parse``: parse failures of ``dspy.Predict("question -> answer")`` on demo problems under
  DSPy's ChatAdapter (with and without its JSON fallback), JSONAdapter and `SmallModelAdapter`.
- ``threads``: throughput of the ``"lock"`` and ``"pool"`` strategies with 1, 2 and 4 caller threads.
- ``accuracy``: accuracy of several instructions on the demo task.

Everything runs offline on ``local/smollm2`` with greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dspy  # noqa: E402
from dspy.utils.exceptions import AdapterParseError  # noqa: E402

from dspy_opro.local import SmallModelAdapter, gguf, local_lm, register, text_lm  # noqa: E402
from dspy_opro.tasks import demo  # noqa: E402

SECTIONS = ("latency", "parse", "threads", "accuracy")

INSTRUCTIONS = (
    "",
    " ",
    "Let's think step by step.",
    "Answer with just the number.",
    "Solve the math word problem.",
    "Math problem to solve.",
    "Answer the question with the appropriate answer.",
    "Answer the question.",
    "Compute the answer and write only the final number.",
)


def _load() -> str:
    """The 1-minute load average: other processes on the machine skew every figure here."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


class CpuWatch:
    """Wall time of a block, and the CPU other processes used meanwhile (Linux; None elsewhere).

    The machine may be shared: figures taken while other processes compete for the cores are
    not comparable, so the threads section repeats a run until others stayed under a threshold.
    """

    def __enter__(self) -> CpuWatch:
        self._wall, self._own, self._busy = time.perf_counter(), _own_cpu(), _busy_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        busy = _busy_cpu()
        own = _own_cpu() - self._own
        # Cores' worth of CPU used by everything except this process during the block.
        self.others = None if busy is None or self._busy is None else max(0.0, (busy - self._busy - own) / self.seconds)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _busy_cpu() -> float | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def chat_requests(n: int, seed: int) -> list[list[dict]]:
    """The demo program's chat messages for ``n`` problems, as the adapter sends them."""
    adapter = SmallModelAdapter()
    signature = demo.make_program("Answer the question.").signature
    return [adapter.format(signature, [], example.inputs()) for example in demo.make_dataset(n, seed)]


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


def bench_latency(args: argparse.Namespace) -> dict:
    import litellm

    requests = chat_requests(args.calls, seed=100)
    options = {"temperature": 0.0, "max_tokens": args.max_tokens}
    lm = dspy.LM("local/smollm2", engine="litellm", cache=False, num_retries=0, **options)
    text = text_lm("local/smollm2", cache=False, **options)
    prompts = [f"Q: {m[-1]['content'].removeprefix('Question: ')}\nA:" for m in requests]

    def through_litellm(messages):
        return litellm.completion(model="local/smollm2", messages=messages, **options).usage.completion_tokens

    def through_dspy(messages):
        lm(messages=messages)
        return lm.history[-1]["usage"]["completion_tokens"]

    def through_text_lm(prompt):
        text(prompt, stop=["\n"])
        return None

    results = {}
    rows = []
    through_litellm(requests[0])  # load the model before timing
    for name, fn, inputs in (
        ("litellm.completion", through_litellm, requests),
        ("dspy.LM (engine=litellm)", through_dspy, requests),
        ("text_lm (raw text)", through_text_lm, prompts),
    ):
        seconds, tokens = [], []
        with CpuWatch() as watch:
            for item in inputs:
                start = time.perf_counter()
                count = fn(item)
                seconds.append(time.perf_counter() - start)
                if count is not None:
                    tokens.append(count)
        median, p95 = statistics.median(seconds), percentile(seconds, 95)
        mean_tokens = statistics.mean(tokens) if tokens else None
        results[name] = {
            "median_s": median,
            "p95_s": p95,
            "calls": len(seconds),
            "mean_completion_tokens": mean_tokens,
            "other_processes_cores": watch.others,
        }
        rows.append(
            [
                name,
                len(seconds),
                f"{median * 1000:.0f}",
                f"{p95 * 1000:.0f}",
                "-" if not tokens else f"{mean_tokens:.1f}",
                "n/a" if watch.others is None else f"{watch.others:.2f}",
            ]
        )
    table(
        f"Per-call latency, greedy, max_tokens={args.max_tokens}, one thread",
        ["path", "calls", "median ms", "p95 ms", "mean completion tokens", "others (cores)"],
        rows,
    )
    return results


def bench_parse(args: argparse.Namespace) -> dict:
    examples = demo.make_dataset(args.examples, seed=200)
    lm = local_lm(temperature=0.0, max_tokens=args.parse_max_tokens, cache=False)
    adapters = {
        "ChatAdapter (no JSON fallback)": dspy.ChatAdapter(use_json_adapter_fallback=False),
        "ChatAdapter (DSPy default)": dspy.ChatAdapter(),
        "JSONAdapter": dspy.JSONAdapter(),
        "SmallModelAdapter": SmallModelAdapter(),
    }
    results = {}
    rows = []
    for name, adapter in adapters.items():
        failures = correct = 0
        start = time.perf_counter()
        for instructions in args.parse_instructions:
            program = demo.make_program(instructions)
            for example in examples:
                try:
                    with dspy.context(lm=lm, adapter=adapter):
                        prediction = program(**example.inputs())
                except AdapterParseError:
                    failures += 1
                    continue
                correct += demo.answer_metric(example, prediction)
        calls = len(examples) * len(args.parse_instructions)
        results[name] = {"calls": calls, "parse_failures": failures, "correct": correct}
        rows.append(
            [
                name,
                calls,
                failures,
                f"{100 * failures / calls:.0f}%",
                int(correct),
                f"{time.perf_counter() - start:.0f}",
            ]
        )
    table(
        f"Parse failures on the demo task (Predict('question -> answer'), greedy, max_tokens={args.parse_max_tokens}, "
        f"instructions {args.parse_instructions})",
        ["adapter", "calls", "failures", "rate", "correct", "seconds"],
        rows,
    )
    return results


def bench_threads(args: argparse.Namespace) -> dict:
    import litellm

    requests = chat_requests(args.thread_calls, seed=300)
    configs = [(mode, threads) for mode in ("lock", "pool") for threads in (1, 2, 4)]
    runs: dict[tuple[str, int], list[dict]] = {config: [] for config in configs}
    contexts: dict[tuple[str, int], tuple[int, int]] = {}
    # Rounds interleave the configurations, so load from other processes spreads over all of them;
    # a run during which other processes used more than --max-others cores is repeated.
    for _ in range(args.rounds):
        for mode, threads in configs:
            for _attempt in range(args.tries):
                gguf.unload_all()
                options = {"temperature": 0.0, "max_tokens": args.max_tokens, "concurrency": mode}

                def call(messages, options=options):
                    response = litellm.completion(model="local/smollm2", messages=messages, **options)
                    return response.usage.completion_tokens

                with ThreadPoolExecutor(max_workers=threads) as pool:
                    list(pool.map(call, requests[:threads]))  # load the contexts this many callers use
                    with CpuWatch() as watch:
                        tokens = sum(pool.map(call, requests))
                if watch.others is None or watch.others <= args.max_others:
                    break
            runs[(mode, threads)].append({"seconds": watch.seconds, "tokens": tokens, "others": watch.others})
            settings = gguf.runtime_settings("smollm2", concurrency=mode)
            contexts[(mode, threads)] = (gguf.get_runtime(settings).loaded, settings.n_threads)
    results = {}
    rows = []
    for mode, threads in configs:
        measured = runs[(mode, threads)]
        rates = sorted(len(requests) / run["seconds"] for run in measured)
        token_rates = sorted(run["tokens"] / run["seconds"] for run in measured)
        others = [run["others"] for run in measured if run["others"] is not None]
        loaded, per_context = contexts[(mode, threads)]
        results[f"{mode}/{threads}"] = {
            "calls_per_s": rates,
            "completion_tokens_per_s": token_rates,
            "other_processes_cores": others,
            "contexts": loaded,
            "threads_per_context": per_context,
        }
        rows.append(
            [
                mode,
                threads,
                loaded,
                per_context,
                f"{statistics.median(rates):.2f}",
                f"{rates[-1]:.2f}",
                f"{statistics.median(token_rates):.0f}",
                f"{max(others):.2f}" if others else "n/a",
            ]
        )
    table(
        f"Throughput, {len(requests)} chat calls per run, {args.rounds} interleaved rounds, greedy, "
        f"max_tokens={args.max_tokens}, {gguf.cpu_count()} cores",
        [
            "mode",
            "caller threads",
            "contexts",
            "llama threads/context",
            "calls/s median",
            "calls/s best",
            "tokens/s median",
            "others (cores, max)",
        ],
        rows,
    )
    return results


def bench_accuracy(args: argparse.Namespace) -> dict:
    examples = demo.make_dataset(args.accuracy_examples, seed=0)
    lm = demo.task_lm(cache=False)
    results = {}
    rows = []
    for instructions in args.instructions:
        start = time.perf_counter()
        accuracy = demo.evaluate_instruction(instructions, examples, lm=lm, num_threads=args.threads)
        correct = round(accuracy * len(examples))
        results[instructions] = {"correct": correct, "n": len(examples)}
        label = (
            "(blank: no system message)"
            if instructions == " "
            else "(empty: DSPy's default)"
            if not instructions
            else instructions
        )
        rows.append([label, f"{correct}/{len(examples)}", f"{time.perf_counter() - start:.0f}"])
    table(
        f"Demo task accuracy by instruction (make_dataset({len(examples)}, seed=0), greedy, "
        f"max_tokens={demo.TASK_LM_SETTINGS['max_tokens']}, SmallModelAdapter)",
        ["instruction", "correct", "seconds"],
        rows,
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--calls", type=int, default=30, help="calls per latency path")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--examples", type=int, default=20, help="demo problems per adapter in the parse section")
    parser.add_argument("--parse-max-tokens", type=int, default=128)
    parser.add_argument("--parse-instructions", nargs="+", default=["", "Answer the question."])
    parser.add_argument("--thread-calls", type=int, default=16, help="calls per lock/pool measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the lock/pool measurements")
    parser.add_argument(
        "--max-others", type=float, default=0.2, help="repeat a lock/pool run if other processes used more cores"
    )
    parser.add_argument("--tries", type=int, default=5, help="attempts per lock/pool run before keeping a loaded one")
    parser.add_argument("--accuracy-examples", type=int, default=40)
    parser.add_argument("--instructions", nargs="+", default=list(INSTRUCTIONS))
    parser.add_argument("--threads", type=int, default=2, help="threads for the accuracy section")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    register()
    print(f"model: {gguf.resolve_model_path('smollm2')}  cores: {gguf.cpu_count()}  load: {_load()}")
    results = {}
    for section in chosen:
        start = time.perf_counter()
        results[section] = globals()[f"bench_{section}"](args)
        print(f"({section}: {time.perf_counter() - start:.0f} s; load average now {_load()})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
