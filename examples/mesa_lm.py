"""A byte-level language model with mesa layers: softmax, mesa and hybrid stacks at equal parameter count.

Trains three small :class:`mesa_module.MesaLM` models on the same text, with the same seed, the same batches in the
same order and the same optimiser, differing only in their attention layers:

* ``softmax``: every block has causal softmax attention (rotary positions, KV cache when decoding);
* ``mesa``: every block has a MesaNet-style mesa layer (gates, short convolution, gated output norm);
* ``hybrid``: mesa layers with softmax attention in every ``--hybrid-every``-th block (default: alternating).

A mesa layer has more weights than a softmax layer of the same width (output gate, input and forget gates, short
convolution), so the stacks with softmax layers get a slightly wider MLP until their parameter counts match the
all-mesa stack's.

The corpus is offline and always installed: the documentation topics that ship with CPython in
``pydoc_data.topics`` (the text behind ``help("assert")`` and friends, about 450 KB of English and Python), joined in
sorted key order. Tokens are UTF-8 bytes (vocabulary 256), so the loss in nats per token divided by ln 2 is bits
per byte. The last ``--val-fraction`` of the bytes is the validation split.

The script logs the validation loss every ``--eval-interval`` steps, then prints a table (parameters, final
validation loss and bits per byte, training and decoding throughput), checks for every stack that decoding token by
token with the layers' states (recurrent state for mesa layers, KV cache for softmax layers) reproduces the logits of
one full forward pass, prints a sampled continuation from each model, and writes a plot of validation loss vs step
and vs training time (default ``runs/mesa_lm.png``).

    python examples/mesa_lm.py                       # defaults: about 6 minutes on a 2-core CPU
    python examples/mesa_lm.py --steps 2000 --d-model 256 --layers 6 --out runs/mesa_lm_larger.png
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mesa_module import MesaLM, MesaLMConfig

# The helpers shared with mesa_lm_with_opro.py live next to this script; its folder is on the import path when it
# runs as a script, not when it is loaded from a file path (as the tests do).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mesa_training import learning_rate_factor, make_optimizer  # noqa: E402

logger = logging.getLogger("mesa_lm")

CORPUS_SOURCE = f"pydoc_data.topics (Python {platform.python_version()} standard library documentation topics)"
STACKS = ("softmax", "mesa", "hybrid")


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_corpus() -> bytes:
    """The CPython documentation topics as UTF-8 bytes, in sorted key order so the split is reproducible."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


@dataclass
class Splits:
    train: torch.Tensor  # (N_train,) int64 byte values
    val: torch.Tensor  # (N_val,)


def split_by_position(data: bytes, val_fraction: float) -> Splits:
    """The first ``1 - val_fraction`` of the bytes for training, the rest for validation (no shuffling)."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1.0 - val_fraction))
    return Splits(tokens[:cut], tokens[cut:])


def random_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at random offsets: inputs (B, T) and next-byte targets (B, T)."""
    starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def validation_windows(data: torch.Tensor, n_windows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_windows`` windows evenly spaced over the validation split: the same bytes at every evaluation."""
    n_windows = max(1, min(n_windows, (len(data) - 1) // seq_len))
    starts = torch.linspace(0, len(data) - seq_len - 1, n_windows).long()
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------------------------------------------
# Models at equal parameter count


@dataclass
class Settings:
    """The command-line flags."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    eval_interval: int = 25
    eval_windows: int = 32
    val_fraction: float = 0.1
    hybrid_every: int = 2
    sample_tokens: int = 200
    seed: int = 0
    threads: int = 1
    out: Path = field(default_factory=lambda: Path("runs/mesa_lm.png"))


def attention_pattern(stack: str, settings: Settings) -> tuple[str, ...]:
    """Per-block attention kinds; the hybrid puts softmax in every ``hybrid_every``-th block, the rest mesa."""
    if stack == "hybrid":
        every = settings.hybrid_every
        return tuple("softmax" if (i + 1) % every == 0 else "mesa" for i in range(settings.layers))
    return (stack,) * settings.layers


def model_config(settings: Settings, attention: tuple[str, ...], mlp_hidden: int) -> MesaLMConfig:
    # mlp_ratio is turned into a width with int(); the half keeps float rounding from landing one below mlp_hidden.
    return MesaLMConfig(
        vocab_size=256,
        d_model=settings.d_model,
        n_layers=settings.layers,
        n_heads=settings.heads,
        attention=attention,
        mlp_ratio=(mlp_hidden + 0.5) / settings.d_model,
    )


def count_parameters(config: MesaLMConfig) -> int:
    with torch.device("meta"):
        return MesaLM(config).num_parameters()


def matched_configs(settings: Settings) -> dict[str, MesaLMConfig]:
    """One config per stack, each MLP widened so its parameter count is as close as possible to the all-mesa stack's.

    The all-mesa stack keeps the standard 4x MLP: a mesa layer has the most weights per block, so the others only ever
    grow. Parameters are linear in the MLP width, which gives the width in one step.
    """
    base_hidden = 4 * settings.d_model
    target = count_parameters(model_config(settings, attention_pattern("mesa", settings), base_hidden))
    configs = {}
    for stack in STACKS:
        attention = attention_pattern(stack, settings)
        at_base = count_parameters(model_config(settings, attention, base_hidden))
        per_unit = count_parameters(model_config(settings, attention, base_hidden + 1)) - at_base
        hidden = base_hidden + max(0, round((target - at_base) / per_unit))
        configs[stack] = model_config(settings, attention, hidden)
    return configs


def mlp_hidden(config: MesaLMConfig) -> int:
    return int(config.mlp_ratio * config.d_model)


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class RunResult:
    """What one stack's training produced."""

    stack: str
    config: MesaLMConfig
    params: int
    eval_steps: list[int]
    val_losses: list[float]
    eval_train_seconds: list[float]  # training time (evaluation excluded) at each evaluation
    train_tokens_per_s: float
    train_seconds: float
    model: MesaLM = field(repr=False)


@torch.no_grad()
def evaluate(model: MesaLM, windows: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    _, loss = model(*windows)
    model.train()
    return loss.item()


def train_stack(stack: str, config: MesaLMConfig, splits: Splits, settings: Settings) -> RunResult:
    """Trains one stack; the seed fixes both the initialisation and the batch order, identically for every stack."""
    torch.manual_seed(settings.seed)
    model = MesaLM(config)
    optimizer = make_optimizer(model, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup=settings.warmup, steps=settings.steps)
    )
    batches = torch.Generator().manual_seed(settings.seed)
    val = validation_windows(splits.val, settings.eval_windows, settings.seq_len)

    eval_steps, val_losses, eval_seconds = [0], [evaluate(model, val)], [0.0]
    logger.info("%s: step 0, val loss %.3f", stack, val_losses[0])
    train_seconds = 0.0
    for step in range(1, settings.steps + 1):
        inputs, targets = random_batch(splits.train, settings.batch_size, settings.seq_len, batches)
        start = time.perf_counter()
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        train_seconds += time.perf_counter() - start
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{stack}: training loss is {loss.item()} at step {step}")
        if step % settings.eval_interval == 0 or step == settings.steps:
            eval_steps.append(step)
            val_losses.append(evaluate(model, val))
            eval_seconds.append(train_seconds)
            logger.info(
                "%s: step %d/%d, train loss %.3f, val loss %.3f (%.2f bits/byte), %.0f s",
                stack,
                step,
                settings.steps,
                loss.item(),
                val_losses[-1],
                val_losses[-1] / math.log(2),
                train_seconds,
            )
    tokens = settings.steps * settings.batch_size * settings.seq_len
    return RunResult(
        stack=stack,
        config=config,
        params=model.num_parameters(),
        eval_steps=eval_steps,
        val_losses=val_losses,
        eval_train_seconds=eval_seconds,
        train_tokens_per_s=tokens / max(train_seconds, 1e-9),
        train_seconds=train_seconds,
        model=model,
    )


# ----------------------------------------------------------------------------------------------------------------
# Decoding


@torch.no_grad()
def decode_matches_forward(model: MesaLM, tokens: torch.Tensor) -> float:
    """Largest |logit difference| between one full forward pass over ``tokens`` and two ways of decoding them.

    The full pass runs the mesa layers' chunkwise algorithm and softmax attention over the whole window. The
    decodings carry each layer's state (the mesa layers' statistics and convolution inputs, the softmax layers' KV
    cache): one feeds every token alone from the start, so the mesa layers run their recurrent algorithm throughout;
    the other prefills the first half in one call, as ``generate`` does, and continues one token at a time from the
    state the chunkwise algorithm returned. All must agree up to float32 rounding.
    """
    model.eval()
    full, _ = model(tokens)
    worst = 0.0
    for prefill in (0, tokens.shape[1] // 2):
        state, pieces = None, []
        if prefill:
            logits, _, state = model(tokens[:, :prefill], return_state=True)
            pieces.append(logits)
        for t in range(prefill, tokens.shape[1]):
            logits, _, state = model(tokens[:, t : t + 1], state=state, return_state=True)
            pieces.append(logits)
        worst = max(worst, (full - torch.cat(pieces, dim=1)).abs().max().item())
    return worst


@torch.no_grad()
def sample(model: MesaLM, prompt: torch.Tensor, new_tokens: int, seed: int) -> tuple[str, float]:
    """A sampled continuation of ``prompt`` (1, T) and the decoding speed in new tokens per second (prefill included)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(prompt, new_tokens, temperature=0.8, top_k=40, generator=generator)
    seconds = time.perf_counter() - start
    text = bytes(out[0, prompt.shape[1] :].tolist()).decode("utf-8", errors="replace")
    return text, new_tokens / seconds


def sample_prompt(val: torch.Tensor, length: int = 48) -> torch.Tensor:
    """About ``length`` bytes from the start of a validation paragraph, cut after a whole word, as a (1, T) prompt."""
    text = bytes(val[: min(len(val), 20_000)].tolist())
    start = text.find(b"\n\n", len(text) // 4)
    start = 0 if start < 0 else start + 2
    while start < len(text) and text[start : start + 1].isspace():
        start += 1
    end = text.rfind(b" ", start, start + length)
    end = start + length if end <= start else end
    return val[start:end][None]


# ----------------------------------------------------------------------------------------------------------------
# Report


def format_table(results: dict[str, RunResult], decode: dict[str, tuple[float, float]]) -> str:
    header = (
        "| stack | layers | params | MLP width | val loss | val bits/byte | train tokens/s | decode tokens/s "
        "| max abs(decode - forward) |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stack, result in results.items():
        layers = "-".join("M" if kind == "mesa" else "S" for kind in result.config.attention)
        decode_speed, max_diff = decode[stack]
        final = result.val_losses[-1]
        lines.append(
            f"| {stack} | {layers} | {result.params:,} | {mlp_hidden(result.config)} | {final:.3f} "
            f"| {final / math.log(2):.3f} | {result.train_tokens_per_s:,.0f} | {decode_speed:,.0f} | {max_diff:.1e} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, RunResult], settings: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (stack, result) in enumerate(results.items()):
        label = f"{stack} ({result.params / 1e6:.2f}M)"
        by_step.plot(result.eval_steps, result.val_losses, marker=".", color=f"C{i}", label=label)
        by_time.plot(result.eval_train_seconds, result.val_losses, marker=".", color=f"C{i}", label=label)
    by_step.set_xlabel("training step")
    by_time.set_xlabel("training time (s, this machine)")
    by_step.set_ylabel("validation loss (nats/byte)")
    bits = by_time.secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda x: x * math.log(2)))
    bits.set_ylabel("bits/byte")
    # The first evaluation (about ln 256) would flatten everything that follows.
    later = [loss for result in results.values() for loss in result.val_losses[1:]]
    if later:
        by_step.set_ylim(min(later) - 0.05, max(later) + 0.1)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Byte-level LM on pydoc_data.topics: d_model {settings.d_model}, {settings.layers} layers, "
        f"seq {settings.seq_len}, batch {settings.batch_size}, {settings.steps} steps"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Report:
    """What :func:`run` returns: the trained stacks and the decoding checks."""

    results: dict[str, RunResult]
    decode: dict[str, tuple[float, float]]  # stack -> (decode tokens/s, max |decode - forward| logits)
    samples: dict[str, str]
    prompt: str


def run(settings: Settings) -> Report:
    data = load_corpus()
    splits = split_by_position(data, settings.val_fraction)
    logger.info(
        "corpus: %s, %d bytes; train %d bytes, validation (last %.0f%%) %d bytes",
        CORPUS_SOURCE,
        len(data),
        len(splits.train),
        100 * settings.val_fraction,
        len(splits.val),
    )
    configs = matched_configs(settings)
    for stack, config in configs.items():
        logger.info(
            "%s: attention %s, MLP width %d, %d parameters",
            stack,
            "/".join(config.attention),
            mlp_hidden(config),
            count_parameters(config),
        )

    results = {stack: train_stack(stack, config, splits, settings) for stack, config in configs.items()}

    check_tokens = validation_windows(splits.val, 1, settings.seq_len)[0]
    prompt = sample_prompt(splits.val)
    decode, samples = {}, {}
    for stack, result in results.items():
        max_diff = decode_matches_forward(result.model, check_tokens)
        text, speed = sample(result.model, prompt, settings.sample_tokens, settings.seed)
        decode[stack], samples[stack] = (speed, max_diff), text
    prompt_text = bytes(prompt[0].tolist()).decode("utf-8", errors="replace")
    return Report(results, decode, samples, prompt_text)


def main(argv: list[str] | None = None) -> Report:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per stack")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="bytes per training sequence")
    parser.add_argument("--d-model", type=int, default=defaults.d_model, help="residual width")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="blocks per model")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="heads per attention layer")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    parser.add_argument("--eval-interval", type=int, default=defaults.eval_interval, help="steps between evaluations")
    parser.add_argument("--eval-windows", type=int, default=defaults.eval_windows, help="validation windows")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="validation share")
    parser.add_argument(
        "--hybrid-every", type=int, default=defaults.hybrid_every, help="hybrid: softmax in every N-th block"
    )
    parser.add_argument("--sample-tokens", type=int, default=defaults.sample_tokens, help="bytes to generate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and batch-order seed")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=defaults.out, help="plot path (PNG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings(**{name: getattr(args, name) for name in Settings.__dataclass_fields__})
    if settings.hybrid_every < 1 or settings.hybrid_every > settings.layers:
        parser.error(f"--hybrid-every must be between 1 and --layers ({settings.layers})")

    start = time.perf_counter()
    threads = torch.get_num_threads()
    # These matrices are small: a second thread gains little, and when other processes share the cores, threads
    # waiting for each other at every operation can make a step tens of times slower. One thread is the safe default.
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        report = run(settings)
    finally:
        torch.set_num_threads(threads)
    results = report.results

    print(f"\nCorpus: {CORPUS_SOURCE}; byte-level, last {100 * settings.val_fraction:.0f}% held out for validation.")
    print(
        f"Each stack: {settings.steps} steps x {settings.batch_size} sequences x {settings.seq_len} bytes, "
        f"same seed ({settings.seed}) and batch order, {settings.threads or torch.get_num_threads()} CPU thread(s); "
        "M = mesa block, S = softmax block.\n"
    )
    print(format_table(results, report.decode))
    params = [result.params for result in results.values()]
    print(f"\nparameter counts differ by at most {100 * (max(params) - min(params)) / max(params):.2f}%")
    print(
        "decode tokens/s: generate() of one sequence, prefill of the prompt included; "
        "max abs(decode - forward): logits from decoding with the layers' states (token by token from the start, and "
        "after a prefill of half the window) vs one full forward pass"
    )
    print(f"\nPrompt (from the validation split): {report.prompt!r}")
    for stack, text in report.samples.items():
        print(f"\n--- {stack} ---\n{report.prompt}{text}")
    plot(results, settings, args.out)
    print(f"\nplot: {args.out}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return report


if __name__ == "__main__":
    main()
