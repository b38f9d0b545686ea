"""OPRO tunes the instruction of a DSPy program that runs on a small mesa-layer language model trained here.

Three parts, all offline on a CPU:

1. **A task family where the instruction selects the behaviour.** Each example is an instruction, a list of distinct
   digits (3 to 6 of them) and the answer: the list copied, reversed or sorted, as the instruction says. Instructions
   are drawn from a small grammar: a verb that names the operation ("Sort the list", "Reverse the digits") or a plain
   verb with a qualifier ("Write the items in ascending order", "Give them backwards"), sometimes with a neutral
   sentence before ("Here is a list.") or after ("Be precise."), in lower case or without a full stop. An
   instruction that names no operation, the empty one included, asks for the list unchanged (copy).
2. **A byte-level** :class:`mesa_module.MesaLM` (three mesa-layer blocks, about 0.4M parameters) trained on freshly
   drawn examples for ``--train-steps`` steps, with the loss on the answer bytes only. The model reads
   ``<BOS> instruction <SEP> digits <ANS>`` and writes the answer digits and an end byte. It is served to DSPy as the
   litellm model ``local/mesa-lists`` with `dspy_opro.local.register_generator`: the generator takes the system
   message (the instruction) and the user's ``Items: 3 1 2`` line, and decodes greedily with the layers' recurrent
   state until the end byte.
3. **OPRO on a DSPy program** ``dspy.Predict("items -> result")`` run on that model with `SmallModelAdapter`, with
   a metric for one target operation (``--operation``, default ``sort``), starting from "Process the list.", an
   instruction that names no operation. The optimizer is the embedded SmolLM2-135M (or any litellm model,
   ``--prompt-model``); it is told the goal in words (`TASK_DESCRIPTIONS`) and must find wording that the mesa model
   follows.

The script prints how each canonical phrasing ("Copy the list.", "Reverse the list.", "Sort the list."), a phrasing
the grammar never produces, and the baselines steer the model (the share of answers equal to each operation's
result), then the baseline and optimized scores on the training, validation and test lists, the optimized
instruction, and writes a plot of OPRO's trajectory and of the test scores (default ``runs/mesa_lm_with_opro.png``).

    python examples/mesa_lm_with_opro.py                                   # trains, then runs OPRO (README: timings)
    python examples/mesa_lm_with_opro.py --model-path runs/mesa_lists.pt   # saves the model; a rerun skips training
    python examples/mesa_lm_with_opro.py --operation reverse --prompt-model openai/gpt-4o-mini
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dspy_opro import OPRO, ModelSetup, setup_models  # noqa: E402
from dspy_opro.local import Generation, GenerationRequest, register_generator  # noqa: E402
from dspy_opro.study import Row, compare, describe, format_table, plot_study  # noqa: E402
from mesa_module import MesaLM, MesaLMConfig  # noqa: E402

# The training helpers shared with mesa_lm.py live next to this script; its folder is on the import path when it
# runs as a script, not when it is loaded from a file path (as the tests do).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mesa_training import learning_rate_factor, make_optimizer  # noqa: E402

logger = logging.getLogger("mesa_lm_with_opro")

MODEL_NAME = "mesa-lists"
LOCAL_PROMPT_MODEL = "local/smollm2"

# ----------------------------------------------------------------------------------------------------------------
# The task family

ALPHABET = "0123456789"
MIN_ITEMS, MAX_ITEMS = 3, 6

OPERATIONS: dict[str, Callable[[Sequence[str]], list[str]]] = {
    "copy": lambda items: list(items),
    "reverse": lambda items: list(reversed(items)),
    "sort": lambda items: sorted(items),
}
CANONICAL = {"copy": "Copy the list.", "reverse": "Reverse the list.", "sort": "Sort the list."}
# Phrasings the grammar below never produces: do the operation's words carry over to a new sentence?
UNSEEN = {"copy": "Same order, please.", "reverse": "Reversed order, please.", "sort": "Sorted order, please."}
# OPRO starts here: it names no operation, so the model copies the list.
BASELINE = "Process the list."
# A single space leaves the signature's instruction blank (DSPy would replace "" with its default sentence), so
# SmallModelAdapter sends no system message at all.
EMPTY_INSTRUCTION = " "
# What the optimizer model is told about the goal (the "base" meta-prompt's task line).
TASK_DESCRIPTIONS = {
    "copy": "copying the items of a list unchanged",
    "reverse": "reversing the order of the items of a list",
    "sort": "sorting the items of a list in ascending order",
}

OPERATION_VERBS = {
    "copy": ("Copy", "Repeat", "Echo", "Duplicate"),
    "reverse": ("Reverse", "Invert", "Flip"),
    "sort": ("Sort", "Order", "Arrange", "Rearrange"),
}
PLAIN_VERBS = ("Write", "Return", "Give", "List", "Output", "Print", "Show", "Put")
OBJECTS = (
    "the list",
    "the items",
    "these items",
    "the elements",
    "them",
    "the sequence",
    "the digits",
    "the values",
    "this list",
    "the numbers",
)
QUALIFIERS = {
    "copy": (
        "unchanged",
        "as they are",
        "in the same order",
        "exactly as given",
        "without changes",
        "as is",
        "in their original order",
    ),
    "reverse": (
        "backwards",
        "in reverse order",
        "from the end to the start",
        "in the opposite order",
        "back to front",
        "reversed",
        "from right to left",
        "last one first",
    ),
    "sort": (
        "in ascending order",
        "from smallest to largest",
        "in increasing order",
        "in sorted order",
        "from lowest to highest",
        "in order",
        "smallest first",
    ),
}
PREAMBLES = (
    "Here is a list.",
    "Look at the items.",
    "Read the list carefully.",
    "You get a list.",
    "Task:",
    "Instructions:",
    "Please",
    "Now",
    "Consider the input.",
)
POSTSCRIPTS = (
    "Answer with the digits only.",
    "Be precise.",
    "Do not add anything else.",
    "Keep every item.",
    "Write nothing else.",
    "Thanks.",
    "Use the same digits.",
)


def draw_instruction(operation: str, rng: random.Random) -> str:
    """One phrasing of ``operation`` from the grammar (see the module docstring); copy may get no operation words."""
    parts = []
    if rng.random() < 0.3:
        parts.append(rng.choice(PREAMBLES))
    if operation != "copy" or rng.random() < 0.75:
        if rng.random() < 0.5:
            phrase = f"{rng.choice(OPERATION_VERBS[operation])} {rng.choice(OBJECTS)}"
            if rng.random() < 0.4:
                phrase += f" {rng.choice(QUALIFIERS[operation])}"
        else:  # a plain verb says nothing by itself: the qualifier names the operation
            phrase = f"{rng.choice(PLAIN_VERBS)} {rng.choice(OBJECTS)} {rng.choice(QUALIFIERS[operation])}"
        phrase += rng.choice((".", ".", ".", "!", ""))
        parts.append(phrase.lower() if rng.random() < 0.15 else phrase)
    if rng.random() < 0.25:
        parts.append(rng.choice(POSTSCRIPTS))
    return " ".join(parts)


def draw_items(rng: random.Random) -> list[str]:
    """Distinct digits in random order, between `MIN_ITEMS` and `MAX_ITEMS` of them."""
    return rng.sample(ALPHABET, rng.randint(MIN_ITEMS, MAX_ITEMS))


# ----------------------------------------------------------------------------------------------------------------
# Bytes in, bytes out

# Control bytes mark the parts; they never occur in an instruction (`clean_instruction` removes them).
BOS, SEP, ANS, END = 0x02, 0x1E, 0x1D, 0x03


def clean_instruction(text: str) -> str:
    """Whitespace collapsed to single spaces and control characters dropped, as in training."""
    return " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())


def encode_prompt(instruction: str, items: Sequence[str]) -> list[int]:
    """``<BOS> instruction <SEP> digits <ANS>`` as byte values; the digits are written without separators."""
    return [BOS, *clean_instruction(instruction).encode("utf-8"), SEP, *"".join(items).encode("ascii"), ANS]


def make_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` fresh examples, right-padded: inputs (B, T) and targets (B, T), -100 outside the answers.

    Only the answer bytes and the end byte are predicted; padding after them changes nothing before it in a causal
    model, so no attention mask is needed.
    """
    sequences = []
    for _ in range(size):
        operation = rng.choice(list(OPERATIONS))
        items = draw_items(rng)
        answer = [*"".join(OPERATIONS[operation](items)).encode("ascii"), END]
        sequences.append((encode_prompt(draw_instruction(operation, rng), items), answer))
    length = max(len(prompt) + len(answer) for prompt, answer in sequences) - 1
    inputs = torch.zeros(size, length, dtype=torch.long)
    targets = torch.full((size, length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(sequences):
        sequence = prompt + answer
        inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(answer)
    return inputs, targets


@torch.no_grad()
def decode(
    model: MesaLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], bool]:
    """Continue ``prompt`` until the end byte or ``max_new_tokens`` bytes, carrying the layers' recurrent state.

    The prompt is read in one call (the mesa layers' chunkwise algorithm); each new byte then costs one step of
    the recurrent algorithm from the returned state.

    Returns:
        The new bytes (the end byte excluded) and whether the end byte was reached.
    """
    logits, _, state = model(torch.tensor([list(prompt)]), return_state=True)
    out: list[int] = []
    for _ in range(max_new_tokens):
        last = logits[0, -1].float()
        if temperature == 0:
            next_id = int(last.argmax())
        else:
            next_id = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator))
        if next_id == END:
            return out, True
        out.append(next_id)
        logits, _, state = model(torch.tensor([[next_id]]), state=state, return_state=True)
    return out, False


def answer_items(model: MesaLM, instruction: str, items: Sequence[str]) -> list[str]:
    """The model's greedy answer to ``instruction`` for ``items``, as a list of characters."""
    out, _ = decode(model, encode_prompt(instruction, items), 2 * MAX_ITEMS)
    return list(bytes(out).decode("utf-8", errors="replace"))


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainSettings:
    """How the model is built and trained (kept in a saved checkpoint)."""

    steps: int = 700
    batch_size: int = 32
    d_model: int = 96
    layers: int = 3
    heads: int = 4
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0


def model_config(settings: TrainSettings) -> MesaLMConfig:
    # The ungated (2023) mesa layer: a sequence here is under 150 bytes, nothing needs forgetting, and a training
    # step costs a fraction of the gated layer's (the README gives the timings).
    return MesaLMConfig(
        vocab_size=256,
        d_model=settings.d_model,
        n_layers=settings.layers,
        n_heads=settings.heads,
        attention="mesa",
        mesa_gated=False,
    )


def train(settings: TrainSettings, *, log_every: int = 50) -> tuple[MesaLM, list[tuple[int, float]]]:
    """Train a fresh model on freshly drawn examples; returns it (in eval mode) and (step, loss) every ``log_every``."""
    torch.manual_seed(settings.seed)
    model = MesaLM(model_config(settings))
    optimizer = make_optimizer(model, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup=settings.warmup, steps=settings.steps)
    )
    rng = random.Random(settings.seed)
    losses: list[tuple[int, float]] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, settings.steps + 1):
        inputs, targets = make_batch(rng, settings.batch_size)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == settings.steps:
            value = loss.item()
            if value != value:  # NaN
                raise FloatingPointError(f"training loss is NaN at step {step}")
            losses.append((step, value))
            logger.info("step %d/%d: loss %.3f (%.0f s)", step, settings.steps, value, time.perf_counter() - start)
    model.eval()
    return model, losses


CHECKPOINT_FORMAT = 1


def save_model(model: MesaLM, settings: TrainSettings, path: Path) -> None:
    """Weights, config and training settings in one file (``torch.load(..., weights_only=True)`` reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = asdict(model.config)
    config["attention"] = list(config["attention"])
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "train": asdict(settings), "state": model.state_dict()}
    torch.save(payload, path)


def load_model(path: Path) -> tuple[MesaLM, TrainSettings]:
    """A model written by `save_model`, in eval mode, and the settings it was trained with."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this example; delete it or pass another --model-path")
    config = dict(payload["config"])
    config["attention"] = tuple(config["attention"])
    model = MesaLM(MesaLMConfig(**config))
    model.load_state_dict(payload["state"])
    model.eval()
    return model, TrainSettings(**payload["train"])


# ----------------------------------------------------------------------------------------------------------------
# Serving the model to DSPy

_ITEMS_LINE = re.compile(r"^\s*items\s*:(.*)$", re.IGNORECASE)


def read_request(request: GenerationRequest) -> tuple[str, list[str]]:
    """The instruction and the items of a request.

    The items come from the last ``Items: ...`` line of the user message (or of the prompt of a text completion),
    separated by spaces or commas. The instruction is the system message followed by any other lines, so a raw
    prompt ``"Sort the list.\\nItems: 3 1 2"`` works as well as `SmallModelAdapter`'s chat messages.

    Raises:
        ValueError: No items line, or an item the model does not know (the provider answers 400).
    """
    lines = request.user.splitlines()
    found = [i for i, line in enumerate(lines) if _ITEMS_LINE.match(line)]
    if not found:
        raise ValueError("the list model needs a line 'Items: ...' with the digits, e.g. 'Items: 3 1 2'")
    at = found[-1]
    items = [item for item in re.split(r"[\s,]+", _ITEMS_LINE.match(lines[at]).group(1)) if item]
    unknown = [item for item in items if len(item) != 1 or item not in ALPHABET]
    if unknown or not items:
        raise ValueError(f"the list model takes single digits separated by spaces, got {lines[at].strip()!r}")
    instruction = " ".join([request.system, *lines[:at], *lines[at + 1 :]])
    return clean_instruction(instruction), items


class ListModelServer:
    """The generator behind ``local/mesa-lists``: `GenerationRequest` in, the answer digits (space-separated) out.

    Thread-safe: inference reads the weights only, so DSPy's evaluation threads may call it at once.

    Args:
        model: A trained model (eval mode).
    """

    def __init__(self, model: MesaLM):
        self.model = model

    def __call__(self, request: GenerationRequest) -> Generation:
        instruction, items = read_request(request)
        prompt = encode_prompt(instruction, items)
        generator = None
        if request.temperature > 0 and request.seed is not None:
            generator = torch.Generator().manual_seed(request.seed)
        out, finished = decode(
            self.model, prompt, request.max_tokens, temperature=request.temperature, generator=generator
        )
        text = " ".join(bytes(out).decode("utf-8", errors="replace"))
        return Generation(
            text,
            prompt_tokens=len(prompt),
            completion_tokens=len(out) + int(finished),
            finish_reason="stop" if finished else "length",
        )


def served(model: MesaLM, name: str = MODEL_NAME) -> ModelSetup:
    """Register ``model`` as ``local/<name>``: the models to run the program with (greedy answers, the small-model
    adapter, no cache: the name stays while the weights behind it change from run to run)."""
    register_generator(name, ListModelServer(model))
    return setup_models(f"local/{name}", answer_tokens=2 * MAX_ITEMS, cache=False)


def serve(model: MesaLM, name: str = MODEL_NAME) -> dspy.LM:
    """`served`'s task LM: the DSPy LM that runs the program on ``model``."""
    return served(model, name).task_lm


# ----------------------------------------------------------------------------------------------------------------
# The DSPy program, data and metric


def make_program(instruction: str) -> dspy.Predict:
    """``dspy.Predict("items -> result")`` with ``instruction``."""
    return dspy.Predict(dspy.Signature("items -> result").with_instructions(instruction))


def make_examples(n: int, operation: str, rng: random.Random, seen: set[str]) -> list[dspy.Example]:
    """``n`` lists not in ``seen`` (which grows), labelled with ``operation``'s result."""
    examples = []
    while len(examples) < n:
        items = draw_items(rng)
        key = "".join(items)
        if key in seen:
            continue
        seen.add(key)
        result = " ".join(OPERATIONS[operation](items))
        examples.append(dspy.Example(items=" ".join(items), result=result).with_inputs("items"))
    return examples


def make_splits(
    operation: str, sizes: tuple[int, int, int], seed: int
) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    """Disjoint train, validation and test lists (no list in two of them)."""
    rng, seen = random.Random(f"lists-{seed}"), set()
    train, val, test = (make_examples(n, operation, rng, seen) for n in sizes)
    return train, val, test


def _items(text: Any) -> list[str]:
    return [item for item in re.split(r"[\s,]+", str(text or "")) if item]


def result_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> float:
    """1.0 when the predicted items equal the gold result in order (spaces and commas ignored), else 0.0."""
    return float(_items(getattr(prediction, "result", prediction)) == _items(example.result))


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Report:
    """What `main` measured."""

    operation: str
    train_settings: TrainSettings
    trained_here: bool
    losses: list[tuple[int, float]]
    selection: dict[str, dict[str, float]]  # instruction -> operation -> % of test lists answered with its result
    rows: list[Row]
    optimized_instruction: str
    trajectory: list[dict[str, Any]]
    call_counts: dict[str, Any]
    train_seconds: float
    opro_seconds: float
    seconds: float
    plot: Path
    table: str = ""
    selection_table: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def selection_matrix(model: MesaLM, instructions: Sequence[str], lists: Sequence[Sequence[str]]) -> dict:
    """For each instruction, the share (%) of ``lists`` whose answer equals each operation's result.

    A row can exceed 100 in total: for a list that happens to be sorted, copy and sort give the same answer.
    """
    matrix = {}
    for instruction in instructions:
        answers = [answer_items(model, instruction, items) for items in lists]
        matrix[instruction] = {
            operation: 100.0 * sum(a == apply(items) for a, items in zip(answers, lists, strict=True)) / len(lists)
            for operation, apply in OPERATIONS.items()
        }
    return matrix


def format_selection(matrix: dict[str, dict[str, float]], labels: dict[str, str]) -> str:
    lines = [
        f"| {'instruction':32} | {'kind':24} | " + " | ".join(f"{op:>7}" for op in OPERATIONS) + " |",
        f"|{'-' * 34}|{'-' * 26}|" + "|".join("-" * 8 + ":" for _ in OPERATIONS) + "|",
    ]
    for instruction, shares in matrix.items():
        cells = " | ".join(f"{shares[op]:7.1f}" for op in OPERATIONS)
        lines.append(f"| {describe(instruction, 32):32} | {labels[instruction]:24} | {cells} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operation", choices=sorted(OPERATIONS), default="sort", help="the target operation")
    parser.add_argument("--steps", type=int, default=8, help="OPRO steps")
    parser.add_argument("--candidates", type=int, default=8, help="instructions proposed per OPRO step")
    parser.add_argument(
        "--prompt-model",
        default=LOCAL_PROMPT_MODEL,
        help="model that proposes instructions: any litellm model string (default: the embedded SmolLM2-135M)",
    )
    parser.add_argument("--train-steps", type=int, default=defaults.steps, help="training steps of the mesa model")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training examples per step")
    parser.add_argument("--d-model", type=int, default=defaults.d_model, help="residual width of the mesa model")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="mesa blocks")
    parser.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="checkpoint: loaded if it exists (training flags are then ignored), else written after training",
    )
    parser.add_argument("--train-size", type=int, default=30, help="lists OPRO scores every candidate on")
    parser.add_argument("--val-size", type=int, default=30, help="lists that choose among OPRO's best candidates")
    parser.add_argument("--test-size", type=int, default=100, help="held-out lists (reported only)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the training, the lists and OPRO")
    parser.add_argument("--threads", type=int, default=2, help="parallel calls while scoring")
    parser.add_argument("--out", type=Path, default=Path("runs/mesa_lm_with_opro.png"), help="plot path (PNG)")
    parser.add_argument("--verbose", action="store_true", help="log training progress and every OPRO step")
    return parser


def obtain_model(args: argparse.Namespace) -> tuple[MesaLM, TrainSettings, bool, list[tuple[int, float]]]:
    """Load ``--model-path`` if it exists, else train (and save there when given)."""
    if args.model_path is not None and args.model_path.exists():
        model, settings = load_model(args.model_path)
        print(f"Loaded the mesa model from {args.model_path} ({settings.steps} training steps); delete it to retrain.")
        return model, settings, False, []
    settings = TrainSettings(
        steps=args.train_steps,
        batch_size=args.batch_size,
        d_model=args.d_model,
        layers=args.layers,
        seed=args.seed,
    )
    print(
        f"Training the mesa model: {settings.layers} mesa blocks, d_model {settings.d_model}, "
        f"{settings.steps} steps x {settings.batch_size} examples ...",
        flush=True,
    )
    model, losses = train(settings, log_every=max(1, settings.steps // 10))
    if args.model_path is not None:
        save_model(model, settings, args.model_path)
        print(f"Saved the model to {args.model_path}.")
    return model, settings, True, losses


def main(argv: Sequence[str] | None = None, *, prompt_lm: dspy.BaseLM | None = None) -> Report:
    """Run the example.

    Args:
        argv: Command-line arguments (default: ``sys.argv``).
        prompt_lm: An LM to propose instructions instead of ``--prompt-model`` (chat meta-prompt), e.g. a
            scripted LM in tests.

    Returns:
        Everything that was printed and plotted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "candidates", "train_steps", "batch_size", "train_size", "val_size", "test_size"):
        if getattr(args, flag) < (0 if flag == "steps" else 1):
            parser.error(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dspy").setLevel(logging.ERROR)  # DSPy logs every evaluation
    if args.verbose:
        logger.setLevel(logging.INFO)
        logging.getLogger("dspy_opro").setLevel(logging.INFO)

    start = time.perf_counter()
    torch_threads = torch.get_num_threads()
    # Small matrices: a second torch thread gains little, and parallel calls already keep both cores busy.
    torch.set_num_threads(1)
    try:
        return _run(args, prompt_lm, start)
    finally:
        torch.set_num_threads(torch_threads)


def _run(args: argparse.Namespace, prompt_lm: dspy.BaseLM | None, start: float) -> Report:
    operation = args.operation
    train_start = time.perf_counter()
    model, settings, trained_here, losses = obtain_model(args)
    train_seconds = time.perf_counter() - train_start
    if trained_here:
        print(f"Trained in {train_seconds:.0f} s; last loss {losses[-1][1]:.3f}.")
    task = served(model)

    train, val, test = make_splits(operation, (args.train_size, args.val_size, args.test_size), args.seed)
    test_lists = [example["items"].split() for example in test]
    probes = {CANONICAL[op]: f"canonical: {op}" for op in OPERATIONS}
    probes.update({UNSEEN[op]: f"unseen phrasing: {op}" for op in OPERATIONS})
    probes.update({EMPTY_INSTRUCTION: "baseline (empty)", BASELINE: "baseline, OPRO start"})
    selection = selection_matrix(model, list(probes), test_lists)
    selection_table = format_selection(selection, probes)
    print(f"\nHow the instruction steers the model: % of the {len(test_lists)} test lists answered with each result")
    print(selection_table)

    if prompt_lm is None:
        prompt = setup_models(prompt_model=args.prompt_model, proposal_tokens=64)
        prompt_lm, family = prompt.prompt_lm, prompt.meta_prompt
    else:
        family = "chat"
    print(
        f"\nOPRO on '{operation}': task model local/{MODEL_NAME}, prompt model "
        f"{getattr(prompt_lm, 'model', type(prompt_lm).__name__)} ({family} meta-prompt), {args.steps} steps x "
        f"{args.candidates} candidates, {len(train)} training / {len(val)} validation / {len(test)} test lists.",
        flush=True,
    )
    optimizer = OPRO(
        result_metric,
        prompt_model=prompt_lm,
        task_model=task.task_lm,
        num_steps=args.steps,
        candidates_per_step=args.candidates,
        meta_prompt=family,
        initial_instructions=[BASELINE],
        task_description=TASK_DESCRIPTIONS[operation],
        num_threads=args.threads,
        seed=args.seed,
        show_progress=args.verbose,
    )
    baselines = [
        (EMPTY_INSTRUCTION, "baseline (empty)"),
        (BASELINE, "baseline, OPRO start"),
        (CANONICAL[operation], "training phrasing"),
    ]
    study = compare(
        optimizer,
        make_program(BASELINE),
        trainset=train,
        valset=val,
        testset=test,
        metric=result_metric,
        baselines=baselines,
        make_program=make_program,
        context=task.context,
        num_threads=args.threads,
        rescore=("train", "val", "test"),
        echo=None,
    )
    final, counts = study.rows[-1].instruction, study.call_counts
    table = format_table(study.rows, width=60)
    print(f"\nOPRO on '{operation}' (exact match of the result, %):")
    print(table)
    print(f"\nOptimized instruction: {describe(final)}")
    print(
        f"OPRO: {len(study.optimized.candidate_programs)} instructions scored, {counts['metric_calls']} metric calls, "
        f"{counts['task_lm']['calls']} task-model and {counts['prompt_lm']['calls']} prompt-model calls, "
        f"{study.seconds:.0f} s. Proposals: {counts['proposals']}, {counts['unparsed']} without an instruction, "
        f"{counts['duplicates']} repeated."
    )
    title = (
        f"OPRO tunes the instruction of a mesa-layer LM ({model.num_parameters() / 1e6:.2f}M parameters, "
        f"{settings.steps} training steps) for '{operation}'"
    )
    plot_study(study, args.out, title)
    seconds = time.perf_counter() - start
    print(f"\nplot: {args.out}")
    print(f"wall time: {seconds:.0f} s (training {train_seconds:.0f} s, OPRO {study.seconds:.0f} s)")
    return Report(
        operation=operation,
        train_settings=settings,
        trained_here=trained_here,
        losses=losses,
        selection=selection,
        rows=study.rows,
        optimized_instruction=final,
        trajectory=study.trajectory,
        call_counts=counts,
        train_seconds=train_seconds,
        opro_seconds=study.seconds,
        seconds=seconds,
        plot=args.out,
        table=table,
        selection_table=selection_table,
    )


if __name__ == "__main__":
    main()
