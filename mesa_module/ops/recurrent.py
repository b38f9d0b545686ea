"""Recurrent mesa attention: one token at a time, for decoding."""

from __future__ import annotations

import torch

from .naive import token_recurrence


def _cholesky_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(a))


def recurrent_mesa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Token-by-token recurrence with a Cholesky solve per token (see :func:`mesa_module.ops.mesa_attention`).

    Each step costs O(Dk^3) per head whatever the context length, which is what decoding needs;
    the state ``(H, G)`` goes in and comes out unchanged in meaning, so prefill by ``"chunk"`` and
    decoding by ``"recurrent"`` compose. Gradients flow by autograd through the loop, which keeps
    every token's factor: use ``"chunk"`` to train on long sequences.

    Inputs are expected validated and in the compute dtype (float32 or float64).

    Returns:
        ``o`` (B, T, H, Dv), or ``(o, (H_T, G_T))`` when ``output_final_state``.
    """
    o, final = token_recurrence(q, k, v, lam, beta, log_gamma, initial_state, cu_seqlens, _cholesky_solve)
    if output_final_state:
        return o, final
    return o
