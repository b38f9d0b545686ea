"""Recurrent mesa attention: one token at a time, for decoding."""

from __future__ import annotations

import torch


def recurrent_mesa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
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
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if initial_state is None:
        h, g = q.new_zeros(B, H, Dk, Dk), q.new_zeros(B, H, Dv, Dk)
    else:
        h, g = initial_state
        h = (h + h.mT) / 2  # only the symmetric part of a statistic is meaningful
    reg = torch.diag_embed(lam.expand(H, Dk))
    outputs = []
    for t in range(T):
        k_t = k[:, t]
        write = k_t if beta is None else k_t * beta[:, t, :, None]
        if log_gamma is not None:
            decay = log_gamma[:, t].exp()[..., None, None]
            h, g = decay * h, decay * g
        h = h + write[..., :, None] * k_t[..., None, :]
        g = g + v[:, t, :, :, None] * write[..., None, :]
        factor = torch.linalg.cholesky(h + reg)
        x = torch.cholesky_solve(q[:, t, :, :, None], factor)
        outputs.append((g @ x)[..., 0])
    o = torch.stack(outputs, dim=1) if T else q.new_zeros(B, 0, H, Dv)
    if output_final_state:
        return o, (h, g)
    return o
