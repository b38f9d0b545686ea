"""Reference mesa attention: one direct solve per token, written for clarity, not speed."""

from __future__ import annotations

import torch


def naive_mesa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
):
    """Token-by-token recurrence with an explicit linear solve at every step.

    ``H_t = g_t H_{t-1} + b_t k_t k_t^T``, ``G_t = g_t G_{t-1} + b_t v_t k_t^T``,
    ``o_t = G_t (H_t + diag(lam))^{-1} q_t``. Statistics and solves run in at least float32 with
    autocast off; the output comes back in the dtype of ``q``, the final states in the compute dtype.
    Only the symmetric part of an initial ``H_0`` is used (``H`` is symmetric by construction), so
    every method defines the same function of its inputs, gradients included.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        reg = torch.diag_embed(lam.to(dtype).expand(H, Dk))  # (H, Dk, Dk)
        if initial_state is None:
            h = q.new_zeros(B, H, Dk, Dk)
            g = q.new_zeros(B, H, Dv, Dk)
        else:
            h, g = (s.to(dtype) for s in initial_state)
            h = (h + h.mT) / 2
        outputs = []
        for t in range(T):
            k_t, v_t = k[:, t], v[:, t]
            write_k = k_t if beta is None else k_t * beta[:, t, :, None].to(dtype)
            if log_gamma is not None:
                decay = log_gamma[:, t].to(dtype).exp()[..., None, None]
                h, g = decay * h, decay * g
            h = h + write_k[..., :, None] * k_t[..., None, :]
            g = g + v_t[..., :, None] * write_k[..., None, :]
            x = torch.linalg.solve(h + reg, q[:, t, ..., None])  # (B, H, Dk, 1)
            outputs.append((g @ x)[..., 0])
        o = torch.stack(outputs, dim=1).to(out_dtype) if T else q.new_zeros(B, 0, H, Dv).to(out_dtype)
    if output_final_state:
        return o, (h, g)
    return o
