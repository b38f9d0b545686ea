"""Command line: ``python -m dspy_opro demo`` runs OPRO on the embedded local model, offline."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspy_opro", description="OPRO for DSPy programs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="optimize the instruction of a small DSPy program on arithmetic word problems",
        description="Optimize the instruction of dspy.Predict('question -> answer') on arithmetic word "
        "problems with OPRO. Both models default to the embedded SmolLM2-135M (no API key, no network).",
    )
    demo.add_argument("--task-model", default="local/smollm2", help="litellm model string of the task model")
    demo.add_argument("--prompt-model", default="local/smollm2", help="litellm model string of the optimizer model")
    demo.add_argument("--steps", type=int, default=5)
    demo.add_argument("--train", type=int, default=20, help="training problems")
    demo.add_argument("--val", type=int, default=20, help="validation problems")
    demo.add_argument("--test", type=int, default=60, help="held-out test problems")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--no-screening", action="store_true", help="score every candidate on every training problem")
    demo.add_argument("--out-dir", default="runs/demo", help="history (resumable), summary.json, trajectory.png")
    demo.add_argument("-v", "--verbose", action="store_true", help="log every step")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dspy_opro").setLevel(logging.INFO if args.verbose else logging.WARNING)
    # A 48-token answer cap is deliberate here; DSPy would warn about every truncated reply.
    logging.getLogger("dspy").setLevel(logging.ERROR)
    from dspy_opro.demo import run_demo
    from dspy_opro.local import LocalModelError

    try:
        run_demo(
            task_model=args.task_model,
            prompt_model=args.prompt_model,
            steps=args.steps,
            n_train=args.train,
            n_val=args.val,
            n_test=args.test,
            seed=args.seed,
            threads=args.threads,
            screening=not args.no_screening,
            out_dir=args.out_dir,
        )
    except LocalModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
