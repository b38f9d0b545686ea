"""Functional mesa attention: pure functions on tensors.

Three implementations of one function, pinned to each other by the tests:

* ``naive`` (:mod:`.naive`): a direct solve per token, the readable reference;
* ``chunk`` (:mod:`.chunk`): chunkwise and exact, the fast path for training and prefill;
* ``recurrent`` (:mod:`.recurrent`): token by token, for decoding.

The math and the trade-offs are in ``README.md`` beside this file.
"""

from __future__ import annotations

import torch

from .chunk import chunk_mesa_attention
from .naive import naive_mesa_attention
from .packing import check_cu_seqlens
from .recurrent import recurrent_mesa_attention

METHODS = ("auto", "naive", "chunk", "recurrent")

# "auto" decodes token by token up to this length: below it the fixed cost of the chunkwise
# machinery (padding, layout changes, a dozen kernel launches per phase) outweighs the per-token
# solves, and autograd through the short loop stays small.
RECURRENT_MAX_T = 4

_IMPLEMENTATIONS = {
    "naive": naive_mesa_attention,
    "recurrent": recurrent_mesa_attention,
}


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
    cu_seqlens: torch.Tensor | None = None,
):
    """Mesa attention ``o_t = G_t (H_t + Lambda)^{-1} q_t`` over (B, T, H, D) tensors.

    Per batch element and head, ``H_t = gamma_t H_{t-1} + beta_t k_t k_t^T`` and
    ``G_t = gamma_t G_{t-1} + beta_t v_t k_t^T`` (token t is included in its own solve), and
    ``Lambda = diag(lam)`` is not decayed. Every method computes the same function exactly (no
    truncated iteration); statistics and solves run in float32 (float64 if any input is float64)
    with autocast disabled, and ``o`` comes back in the dtype of ``q``.

    Args:
        q: Queries, (B, T, H, Dk).
        k: Keys, (B, T, H, Dk).
        v: Values, (B, T, H, Dv).
        lam: Positive diagonal regulariser, (H, Dk), or (H, 1) for one value per head.
        beta: Input gate, (B, T, H), in [0, 1]; 0 lets a token read without writing. None means 1.
        log_gamma: Log forget gate, (B, T, H), <= 0. None means no forgetting (gamma = 1).
        initial_state: ``(H_0, G_0)`` with shapes (B, H, Dk, Dk) and (B, H, Dv, Dk), e.g. the final
            state of a previous call; only the symmetric part of ``H_0`` is used. None means zeros.
            With ``cu_seqlens``, one state per document: (N, H, Dk, Dk) and (N, H, Dv, Dk).
        output_final_state: Also return ``(H_T, G_T)`` (in the compute dtype); with ``cu_seqlens``,
            one per document (N, ...), an empty document's being its initial state.
        method: ``"chunk"`` (chunkwise, fast for long sequences), ``"recurrent"`` (token by token,
            for decoding), ``"naive"`` (per-token direct solves, the reference) or ``"auto"``
            (recurrent up to ``RECURRENT_MAX_T`` tokens, chunk beyond).
        chunk_size: Tokens per chunk for ``"chunk"`` (64 suits head sizes near 64).
        cu_seqlens: Packed documents: a 1-D integer tensor of offsets ``[0, l_1, l_1 + l_2, ..., T]``
            (flash-linear-attention's convention) into a single row (B == 1). Every statistic
            restarts at a document's first token, so each document is computed as if alone; empty
            documents (repeated offsets) are allowed. For ``"chunk"`` each document starts a chunk of
            its own (its last chunk is padded), so documents much shorter than ``chunk_size`` waste work.

    Returns:
        ``o`` (B, T, H, Dv), or ``(o, (H_T, G_T))`` when ``output_final_state``.

    Raises:
        ValueError: For an unknown method, ``chunk_size < 1``, mismatched shapes or devices,
            non-positive ``lam``, negative ``beta``, positive ``log_gamma``, or ``cu_seqlens`` with
            B != 1 or offsets that do not run from 0 to T without decreasing.
        TypeError: For non-tensor or non-floating-point inputs, or non-integer ``cu_seqlens``.
    """
    _check_inputs(q, k, v, lam, beta, log_gamma, initial_state, method, chunk_size, cu_seqlens)
    T = q.shape[1]
    if method == "auto":
        method = "recurrent" if T <= RECURRENT_MAX_T else "chunk"
    if method == "chunk" and T == 0:
        method = "recurrent"

    tensors = [q, k, v, lam, beta, log_gamma, *(initial_state or ())]
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32

    def cast(t):
        return None if t is None else t.to(dtype)

    with torch.autocast(q.device.type, enabled=False):
        state = None if initial_state is None else (cast(initial_state[0]), cast(initial_state[1]))
        kwargs = dict(
            beta=cast(beta),
            log_gamma=cast(log_gamma),
            initial_state=state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
        )
        if method == "chunk":
            o, final = chunk_mesa_attention(cast(q), cast(k), cast(v), cast(lam), chunk_size=chunk_size, **kwargs)
        else:
            o, final = _IMPLEMENTATIONS[method](cast(q), cast(k), cast(v), cast(lam), **kwargs)
    o = o.to(q.dtype)
    if output_final_state:
        return o, final
    return o


def _check_inputs(q, k, v, lam, beta, log_gamma, initial_state, method, chunk_size, cu_seqlens) -> None:
    """Raises a ValueError or TypeError that names the problem and the fix."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (64 is a good default), got {chunk_size!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("lam", lam)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("beta", beta), ("log_gamma", log_gamma)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (B, T, H, D), got shape {tuple(t.shape)}; "
                "split heads with x.view(B, T, H, D) (the layout is batch, time, heads, features)"
            )
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q (B, T, H, Dk): q is {tuple(q.shape)}, k is {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must share (B, T, H) with q: q is {tuple(q.shape)}, v is {tuple(v.shape)}; only the last "
            "dimension (Dv) may differ"
        )
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if lam.dim() != 2 or lam.shape[0] != H or lam.shape[1] not in (1, Dk):
        raise ValueError(
            f"lam must have shape (H, Dk) = ({H}, {Dk}) or (H, 1) = ({H}, 1), got {tuple(lam.shape)}; "
            "a single value per head is lam.view(H, 1)"
        )
    for name, t in (("beta", beta), ("log_gamma", log_gamma)):
        if t is not None and tuple(t.shape) != (B, T, H):
            raise ValueError(f"{name} must have shape (B, T, H) = {(B, T, H)}, got {tuple(t.shape)}")
    lead, lead_name = B, "B"
    if cu_seqlens is not None:
        lead, lead_name = check_cu_seqlens(cu_seqlens, B, T), "N"  # one state per document
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be a pair (H_0, G_0), e.g. the final state of a previous call")
        h0, g0 = initial_state
        if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != (lead, H, Dk, Dk):
            got = tuple(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__
            raise ValueError(
                f"initial_state[0] (H_0) must have shape ({lead_name}, H, Dk, Dk) = {(lead, H, Dk, Dk)}, got {got}"
            )
        if not isinstance(g0, torch.Tensor) or tuple(g0.shape) != (lead, H, Dv, Dk):
            got = tuple(g0.shape) if isinstance(g0, torch.Tensor) else type(g0).__name__
            raise ValueError(
                f"initial_state[1] (G_0) must have shape ({lead_name}, H, Dv, Dk) = {(lead, H, Dv, Dk)}, got {got}"
            )
    named = [("q", q), ("k", k), ("v", v), ("lam", lam), ("beta", beta), ("log_gamma", log_gamma)]
    if initial_state is not None:
        named += [("initial_state[0]", initial_state[0]), ("initial_state[1]", initial_state[1])]
    for name, t in named:
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move all inputs to one device")

    # Value checks, fetched together so that an accelerator synchronises once.
    checks = [(lam <= 0).any()]
    if beta is not None:
        checks.append((beta < 0).any())
    if log_gamma is not None:
        checks.append((log_gamma > 0).any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        raise ValueError(
            f"lam must be positive (it regularises the solve), got min {lam.min().item():.3g}; "
            "parametrise it e.g. as softplus(theta) + lambda_min"
        )
    if beta is not None and flags[1]:
        raise ValueError(f"beta must lie in [0, 1], got min {beta.min().item():.3g}; use sigmoid(...) or a 0/1 mask")
    if log_gamma is not None and flags[-1]:
        raise ValueError(
            f"log_gamma must be <= 0 (gamma in (0, 1]), got max {log_gamma.max().item():.3g}; "
            "use logsigmoid(...) for a learned forget gate"
        )


__all__ = [
    "METHODS",
    "RECURRENT_MAX_T",
    "mesa_attention",
    "chunk_mesa_attention",
    "naive_mesa_attention",
    "recurrent_mesa_attention",
]
