"""In-context linear regression: one mesa layer learns ridge regression, linear attention one gradient step.

Reproduces the central result of von Oswald et al. (2023), "Uncovering mesa-optimization algorithms in
Transformers": trained on in-context linear regression, a single mesa layer reaches the loss of (optimally
regularised) ridge regression, while a single linear-attention layer behaves like one step of gradient descent and
a single softmax-attention layer does worse still. A mesa layer with hand-set weights equals ridge regression to
floating-point precision.

The task. Each sequence has its own weight vector ``w ~ N(0, I/d)``; inputs ``x ~ N(0, I)`` and targets
``y = w.x + noise`` with noise ``N(0, sigma^2)``. A context token is ``[x_i, y_i]`` and a query token ``[x_q, 0]``;
the prediction is the query's output in the ``y`` slot, scored by ``1/2 (y_hat - y_q)^2``. For this prior the best
possible predictor is ridge regression with penalty ``mu = sigma^2 d``.

One pass, every N. A sequence alternates context and query tokens, ``[x_1, y_1], [x'_1, 0], [x_2, y_2],
[x'_2, 0], ...``. Queries only read: for the mesa layer they are excluded from the statistics by the layer's write
mask (beta = 0); for the attention baselines a query attends to the context tokens before it and to itself, not to
other queries. Query n is therefore exactly the standard problem "n context pairs, one query", and one sequence of
2 N_max tokens gives the loss for every N from 1 to N_max.

Run ``python examples/in_context_regression.py --help`` for the flags; it prints a table of loss vs N and writes a
plot (default ``runs/in_context_regression.png``).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mesa_module import MesaLayer

logger = logging.getLogger("in_context_regression")


# ----------------------------------------------------------------------------------------------------------------
# The task


@dataclass
class Tasks:
    """A batch of regression tasks laid out as interleaved context and query tokens.

    Attributes:
        tokens: (B, 2 N, d + 1): ``[x_i, y_i]`` at even positions, ``[x'_i, 0]`` at odd positions.
        is_context: (2 N,) bool, ``True`` at the context positions.
        x_context: (B, N, d); ``y_context``: (B, N).
        x_query: (B, N, d); ``y_query``: (B, N); query n sees the first n context pairs.
    """

    tokens: torch.Tensor
    is_context: torch.Tensor
    x_context: torch.Tensor
    y_context: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


def sample_tasks(
    batch: int, n_context: int, d: int, noise_std: float, *, generator: torch.Generator, dtype=torch.float32
) -> Tasks:
    """Samples ``batch`` regression tasks with ``n_context`` context pairs and as many queries."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    w = randn(batch, d) / math.sqrt(d)  # signal variance 1 per target
    x_context, x_query = randn(batch, n_context, d), randn(batch, n_context, d)
    y_context = torch.einsum("bnd,bd->bn", x_context, w) + noise_std * randn(batch, n_context)
    y_query = torch.einsum("bnd,bd->bn", x_query, w) + noise_std * randn(batch, n_context)
    tokens = torch.zeros(batch, n_context, 2, d + 1, dtype=torch.float64)
    tokens[:, :, 0, :d], tokens[:, :, 0, d] = x_context, y_context
    tokens[:, :, 1, :d] = x_query
    is_context = torch.arange(2 * n_context) % 2 == 0
    fields = (tokens.reshape(batch, 2 * n_context, d + 1), x_context, y_context, x_query, y_query)
    tokens, x_context, y_context, x_query, y_query = (t.to(dtype) for t in fields)
    return Tasks(tokens, is_context, x_context, y_context, x_query, y_query)


def loss_per_n(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1/2 (y_hat - y)^2`` averaged over the batch: (B, N) -> (N,), entry n-1 for n context pairs."""
    return 0.5 * (prediction - target).square().mean(0)


# ----------------------------------------------------------------------------------------------------------------
# Closed-form baselines


def ridge_predictions(tasks: Tasks, mu: float) -> torch.Tensor:
    """Ridge regression with penalty ``mu`` fitted on the first n context pairs, applied to query n: (B, N)."""
    x, y = tasks.x_context, tasks.y_context
    d = x.shape[-1]
    outer = torch.einsum("bni,bnj->bnij", x, x).cumsum(1)  # X_n^T X_n for every n
    moment = (x * y[..., None]).cumsum(1)  # X_n^T y_n
    eye = torch.eye(d, dtype=x.dtype)
    w = torch.linalg.solve(outer + mu * eye, moment[..., None])[..., 0]
    return (w * tasks.x_query).sum(-1)


def gradient_step_predictions(tasks: Tasks, learning_rate: torch.Tensor) -> torch.Tensor:
    """One gradient step from ``w = 0`` on ``1/2 sum (y - w.x)^2`` over the first n pairs: ``w = lr_n X_n^T y_n``."""
    moment = (tasks.x_context * tasks.y_context[..., None]).cumsum(1)
    return learning_rate * (moment * tasks.x_query).sum(-1)


def best_gradient_step_learning_rate(tasks: Tasks) -> torch.Tensor:
    """The least-squares optimal learning rate of one gradient step for each n, fitted on ``tasks``: (N,)."""
    unit = gradient_step_predictions(tasks, torch.ones(()))
    return (unit * tasks.y_query).sum(0) / unit.square().sum(0)


# ----------------------------------------------------------------------------------------------------------------
# One-layer models: the y slot of a query token's output is its prediction


class MesaRegressor(nn.Module):
    """One mesa layer (the 2023 layer: no gates, no normalisations); queries read without writing."""

    def __init__(self, d: int, *, lambda_init: float = 1.0):
        super().__init__()
        self.layer = MesaLayer(
            d + 1, 1, qk_norm=False, output_norm=False, lambda_init=lambda_init, lambda_min=0.0, method="auto"
        )

    def forward(self, tasks: Tasks) -> torch.Tensor:
        write = tasks.is_context.to(tasks.tokens.dtype).expand(tasks.tokens.shape[:2])
        out = self.layer(tasks.tokens, write_mask=write)
        return out[:, ~tasks.is_context, -1]


def hand_set_mesa_regressor(d: int, mu: float, dtype=torch.float64) -> MesaRegressor:
    """A mesa layer whose weights implement ridge regression with penalty ``mu`` exactly.

    Queries and keys select ``x``, values select ``y``, the regulariser is ``mu I`` and the output projection writes
    the result into the ``y`` slot: the query's output is ``sum_i y_i k_i^T (sum_i k_i k_i^T + mu I)^{-1} x_q``.
    """
    model = MesaRegressor(d, lambda_init=mu).to(dtype)
    select_x = torch.zeros(d + 1, d + 1, dtype=dtype)
    select_x[:d, :d] = torch.eye(d, dtype=dtype)
    select_y = torch.zeros(d + 1, d + 1, dtype=dtype)
    select_y[d, d] = 1.0
    layer = model.layer
    with torch.no_grad():
        layer.q_proj.weight.copy_(select_x)
        layer.k_proj.weight.copy_(select_x)
        layer.v_proj.weight.copy_(select_y)
        layer.o_proj.weight.copy_(select_y)
        # Lambda = softplus(theta) with lambda_min = 0, so theta = softplus^{-1}(mu).
        layer.lambda_theta.fill_(mu + math.log(-math.expm1(-mu)))
    return model


def _query_attention_mask(is_context: torch.Tensor) -> torch.Tensor:
    """(T, T) bool: position i sees the context tokens before it and itself, never another query."""
    T = is_context.shape[0]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return causal & (is_context[None, :] | torch.eye(T, dtype=torch.bool))


class AttentionRegressor(nn.Module):
    """One single-head attention layer, linear (``(q.k) v``, unnormalised) or softmax (``softmax(q.k / sqrt(d))``)."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        if kind not in ("linear", "softmax"):
            raise ValueError(f"kind must be 'linear' or 'softmax', got {kind!r}")
        self.kind = kind
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d + 1, d + 1, bias=False) for _ in range(4))

    def forward(self, tasks: Tasks) -> torch.Tensor:
        x = tasks.tokens
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        allowed = _query_attention_mask(tasks.is_context)
        if self.kind == "linear":
            out = ((q @ k.transpose(1, 2)) * allowed) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out)[:, ~tasks.is_context, -1]


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class Config:
    """Task and training settings (the command-line flags)."""

    d: int = 10
    n_max: int = 40
    noise_std: float = 0.1
    steps: int = 1000
    attention_steps: int = 1000
    batch: int = 128
    lr: float = 1e-2
    eval_batch: int = 4096
    seed: int = 0


def ridge_penalty(config: Config) -> float:
    """The Bayes-optimal ridge penalty ``sigma^2 d`` for this prior, floored for the noise-free limit."""
    return max(config.noise_std**2 * config.d, 1e-3)


def train(model: nn.Module, config: Config, steps: int, seed: int) -> list[float]:
    """Adam with a cosine-decayed learning rate on fresh tasks every step; every query n = 1..n_max counts equally."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    for step in range(steps):
        tasks = sample_tasks(config.batch, config.n_max, config.d, config.noise_std, generator=generator)
        loss = loss_per_n(model(tasks), tasks.y_query).mean()
        optimizer.zero_grad()
        loss.backward()
        # The first steps of the mesa layer can be large while its regulariser adapts; clipping keeps them sane.
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info("  step %d/%d: train loss %.4f", step + 1, steps, sum(losses[-50:]) / len(losses[-50:]))
    return losses


def run(config: Config, seeds: int) -> tuple[dict[str, torch.Tensor], float]:
    """Trains the three layers for each seed and evaluates everything on one shared batch.

    Returns:
        ``(losses, hand_set_max_error)``: loss vs N (index n-1) per method, trained methods averaged over seeds, and
        the largest difference between the hand-set mesa layer's and ridge regression's predictions (float64).
    """
    mu = ridge_penalty(config)
    eval_tasks = sample_tasks(
        config.eval_batch, config.n_max, config.d, config.noise_std, generator=torch.Generator().manual_seed(10**6)
    )
    fit_tasks = sample_tasks(
        config.eval_batch, config.n_max, config.d, config.noise_std, generator=torch.Generator().manual_seed(10**6 + 1)
    )
    eval64 = sample_tasks(
        config.eval_batch,
        config.n_max,
        config.d,
        config.noise_std,
        generator=torch.Generator().manual_seed(10**6),
        dtype=torch.float64,
    )

    losses: dict[str, torch.Tensor] = {}
    ridge64 = ridge_predictions(eval64, mu)
    losses["ridge"] = loss_per_n(ridge64, eval64.y_query)
    learning_rate = best_gradient_step_learning_rate(fit_tasks)
    losses["GD, 1 step"] = loss_per_n(gradient_step_predictions(eval_tasks, learning_rate), eval_tasks.y_query)
    with torch.no_grad():
        hand_set = hand_set_mesa_regressor(config.d, mu)(eval64)
    losses["mesa, hand-set"] = loss_per_n(hand_set, eval64.y_query)
    hand_set_error = (hand_set - ridge64).abs().max().item()

    builders = {
        "mesa, trained": (lambda: MesaRegressor(config.d), config.steps),
        "linear attn": (lambda: AttentionRegressor(config.d, "linear"), config.attention_steps),
        "softmax attn": (lambda: AttentionRegressor(config.d, "softmax"), config.attention_steps),
    }
    for name, (build, steps) in builders.items():
        runs = []
        for seed in range(config.seed, config.seed + seeds):
            torch.manual_seed(seed)
            model = build()
            start = time.perf_counter()
            logger.info("training %s (seed %d, %d steps)", name, seed, steps)
            train(model, config, steps, seed)
            logger.info("  done in %.0f s", time.perf_counter() - start)
            with torch.no_grad():
                runs.append(loss_per_n(model(eval_tasks), eval_tasks.y_query))
        losses[name] = torch.stack(runs).mean(0)
    return {name: loss.double() for name, loss in losses.items()}, hand_set_error


def format_table(losses: dict[str, torch.Tensor], rows: list[int]) -> str:
    names = list(losses)
    header = f"{'N':>4} " + " ".join(f"{name:>15}" for name in names) + f" {'mesa/ridge':>11}"
    lines = [header, "-" * len(header)]
    for n in rows:
        values = " ".join(f"{losses[name][n - 1].item():>15.4f}" for name in names)
        ratio = (losses["mesa, trained"][n - 1] / losses["ridge"][n - 1]).item()
        lines.append(f"{n:>4} {values} {ratio:>11.3f}")
    return "\n".join(lines)


def plot(losses: dict[str, torch.Tensor], config: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = torch.arange(1, config.n_max + 1)
    # Ridge as a wide pale band under everything: the mesa curves lie on it.
    styles = {
        "ridge": dict(color="0.75", linewidth=6, zorder=1),
        "GD, 1 step": dict(color="k", linestyle="--", linewidth=1.5),
        "mesa, hand-set": dict(color="k", linestyle=":", linewidth=1.5, zorder=3),
        "mesa, trained": dict(color="C0", linewidth=2, zorder=2),
        "linear attn": dict(color="C1", linewidth=1.5),
        "softmax attn": dict(color="C2", linewidth=1.5),
    }
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, loss in losses.items():
        ax.plot(n, loss, label=name, **styles.get(name, {}))
    ax.axvline(config.d, color="grey", linewidth=0.5)
    ax.axvline(2 * config.d, color="grey", linewidth=0.5, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("context pairs N")
    ax.set_ylabel("query loss  1/2 (y_hat - y)^2")
    ax.set_title(f"In-context linear regression, d = {config.d}, noise std {config.noise_std}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--d", type=int, default=defaults.d, help="input dimension")
    parser.add_argument("--n-max", type=int, default=defaults.n_max, help="largest number of context pairs")
    parser.add_argument("--noise-std", type=float, default=defaults.noise_std, help="target noise std")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps of the mesa layer")
    parser.add_argument(
        "--attention-steps", type=int, default=defaults.attention_steps, help="training steps of the attention layers"
    )
    parser.add_argument("--batch", type=int, default=defaults.batch, help="tasks per training step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--eval-batch", type=int, default=defaults.eval_batch, help="tasks in the evaluation batch")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per layer (losses are averaged)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="first seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("runs/in_context_regression.png"), help="plot path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    config = Config(
        d=args.d,
        n_max=args.n_max,
        noise_std=args.noise_std,
        steps=args.steps,
        attention_steps=args.attention_steps,
        batch=args.batch,
        lr=args.lr,
        eval_batch=args.eval_batch,
        seed=args.seed,
    )
    losses, hand_set_error = run(config, args.seeds)

    rows = sorted({n for n in (1, 2, 5, config.d, 15, 2 * config.d, 25, 30, 3 * config.d, config.n_max)} - {0})
    rows = [n for n in rows if n <= config.n_max]
    mu = ridge_penalty(config)
    print(f"\nLoss vs N (d = {config.d}, noise std {config.noise_std}, ridge penalty {mu:g}, {args.seeds} seed(s))")
    print(format_table(losses, rows))
    ratio = losses["mesa, trained"] / losses["ridge"]
    tail = ratio[2 * config.d - 1 :]
    if len(tail):
        verdict = "yes" if tail.max() <= 1.1 else "no"
        print(f"\ntrained mesa within 10% of ridge for every N >= 2d: {verdict} (worst ratio {tail.max():.3f})")
    print(f"hand-set mesa vs ridge, largest prediction difference (float64): {hand_set_error:.2e}")
    plot(losses, config, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
