"""Functional mesa attention: pure functions on tensors."""

from __future__ import annotations

import torch

from .naive import naive_mesa_attention

METHODS = ("auto", "naive", "chunk", "recurrent")


def mesa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    *,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    method: str = "auto",
    chunk_size: int = 64,
):
    """Mesa attention ``o_t = G_t (H_t + Lambda)^{-1} q_t`` over (B, T, H, D) tensors.

    Only the reference method exists so far; every method name runs it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return naive_mesa_attention(
        q, k, v, lam, beta=beta, log_gamma=log_gamma, initial_state=initial_state, output_final_state=output_final_state
    )


__all__ = ["mesa_attention", "naive_mesa_attention", "METHODS"]
