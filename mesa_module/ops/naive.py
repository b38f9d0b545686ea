"""Reference mesa attention: one direct solve per token, written for clarity, not speed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .packing import Documents, initial_states


def naive_mesa_attention(
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
    """Token-by-token recurrence with an explicit linear solve at every step.

    ``H_t = g_t H_{t-1} + b_t k_t k_t^T``, ``G_t = g_t G_{t-1} + b_t v_t k_t^T``,
    ``o_t = G_t (H_t + diag(lam))^{-1} q_t``. Statistics and solves run in at least float32 with
    autocast off; the output comes back in the dtype of ``q``, the final states in the compute dtype.
    Only the symmetric part of an initial ``H_0`` is used (``H`` is symmetric by construction), so
    every method defines the same function of its inputs, gradients included. With ``cu_seqlens``
    (B == 1) the state restarts at every document's first token from that document's initial state.
    """
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):

        def cast(t):
            return None if t is None else t.to(dtype)

        state = None if initial_state is None else tuple(cast(s) for s in initial_state)
        o, final = token_recurrence(
            cast(q), cast(k), cast(v), cast(lam), cast(beta), cast(log_gamma), state, cu_seqlens, torch.linalg.solve
        )
    o = o.to(out_dtype)
    if output_final_state:
        return o, final
    return o


def token_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    beta: torch.Tensor | None,
    log_gamma: torch.Tensor | None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None,
    cu_seqlens: torch.Tensor | None,
    solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """The mesa recurrence one token at a time, ``x_t = solve(H_t + Lambda, q_t)``; shared by the
    reference (a general solve) and decoding (a Cholesky solve).

    Returns:
        ``(o, (H, G))``: outputs (B, T, H, Dv) and the final states, (B, ...) or, with ``cu_seqlens``,
        one per document (N, ...): the state after the document's last token, its initial state if empty.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    docs = None if cu_seqlens is None else Documents.from_cu_seqlens(cu_seqlens)
    h_init, g_init = initial_states(q, v, initial_state, docs)
    lead = h_init.shape[0]
    reg = torch.diag_embed(lam.expand(H, Dk))  # (H, Dk, Dk)
    h, g = h_init, g_init
    finals = None if docs is None else [(h_init[n : n + 1], g_init[n : n + 1]) for n in range(lead)]
    outputs = []
    for t in range(T):
        if docs is not None and t in docs.starts:  # a document starts: forget the previous one
            n = docs.starts[t]
            h, g = h_init[n : n + 1], g_init[n : n + 1]
        k_t, v_t = k[:, t], v[:, t]
        write_k = k_t if beta is None else k_t * beta[:, t, :, None]
        if log_gamma is not None:
            decay = log_gamma[:, t].exp()[..., None, None]
            h, g = decay * h, decay * g
        h = h + write_k[..., :, None] * k_t[..., None, :]
        g = g + v_t[..., :, None] * write_k[..., None, :]
        x = solve(h + reg, q[:, t, ..., None])  # (B, H, Dk, 1)
        outputs.append((g @ x)[..., 0])
        if docs is not None and t in docs.ends:
            finals[docs.ends[t]] = (h, g)
    o = torch.stack(outputs, dim=1) if T else q.new_zeros(B, 0, H, Dv)
    if finals is not None:
        h, g = torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals])
    return o, (h, g)
