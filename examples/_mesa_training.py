"""Training helpers shared by the mesa-layer examples (`mesa_lm.py`, `mesa_lm_with_opro.py`).

The scripts import it as ``_mesa_training`` from their own folder.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; matrices decay, while norms, biases and parameters that ask not to (the mesa regulariser) do not.

    Args:
        model: The model to train.
        lr: Peak learning rate (a schedule scales it, see `learning_rate_factor`).
        weight_decay: Decoupled weight decay of the matrices.

    Returns:
        The optimizer, with betas (0.9, 0.95).
    """
    decay, no_decay = [], []
    for param in model.parameters():
        exempt = param.dim() < 2 or getattr(param, "_no_weight_decay", False)
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def learning_rate_factor(step: int, *, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of the peak at step ``steps``.

    Args:
        step: The optimizer steps taken so far (what ``LambdaLR`` passes).
        warmup: Warm-up steps.
        steps: Total training steps.

    Returns:
        The factor applied to the peak learning rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
