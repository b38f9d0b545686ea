"""Chunkwise exact mesa attention: the fast path for training and prefill.

The sequence is cut into chunks of ``C`` tokens (with ``cu_seqlens``, every document starts a chunk of its own).
Everything linear in the statistics (the outputs ``G_t x_t``, the state recurrences, every gradient) is done chunk
by chunk with matrix products, as in chunkwise linear attention. The one nonlinear step, the solves
``x_t = (H_t + Lambda)^{-1} q_t``, has two exact solvers (the math is in ``README.md`` beside this file):

* ``gamma = 1`` everywhere: a Woodbury + Cholesky form. The inverse ``P = (H + Lambda)^{-1}`` is
  computed exactly at the start of each block of chunks (and of each document) and carried through the block by
  low-rank downdates ``P <- P - W^T W``, one small Cholesky factor per leaf of keys; all queries of
  a chunk are then solved at once with ``X = Q P - tril(Q W^T) W``.
* gated (some ``gamma < 1``): the regulariser does not decay, so every token's system is a different shift of a
  nested family and no factorisation but a spectral one is shared. In the basis scaled by ``Lambda^{-1/2}`` the
  regulariser is the identity, which is diagonal in the eigenbasis of the statistic at a sub-chunk start; one
  eigendecomposition per 16-token sub-chunk (computed in the forward pass, kept for the backward one) and a small
  Woodbury capacitance matrix per token then solve exactly. (Chunk sizes without a suitable divisor form every
  token's matrix and solve it directly.)

The backward pass is written by hand (implicit differentiation of the solves): it needs one more
solve per token with the same matrices, ``y_t = (H_t + Lambda)^{-1} G_t^T do_t``, and otherwise only
chunkwise products. Only per-chunk (gated: per-sub-chunk) quantities are kept for it, so memory stays linear in T.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .packing import Documents, initial_states

# Keys per Cholesky factor in the Woodbury path. Smaller leaves mean cheaper factorisations but more
# sequential steps; 16 to 64 is the useful range on CPU.
LEAF_SIZE = 32
# Sequential leaf steps per block in the Woodbury path: the inverse is recomputed exactly at every
# block start, so this bounds both the Python loop length and the drift of the downdated inverse.
MAX_STEPS_PER_BLOCK = 16
# Tokens per eigendecomposition in the gated path (the largest divisor of the chunk size up to this);
# chunk sizes with no divisor from 4 up fall back to direct per-token solves.
EIG_SUBCHUNK = 16
# Blocks of a sub-chunk's tokens in the gated path, each with its own capacitance size (a token reads only the
# keys before it).
CAPACITANCE_BLOCKS = 2
# Upper bound on the elements of the per-token tensors the gated path forms at once.
SOLVE_GROUP_ELEMENTS = 1 << 22


def chunk_mesa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: torch.Tensor | None = None,
):
    """Chunkwise exact mesa attention (see :func:`mesa_module.ops.mesa_attention` for the arguments).

    Inputs are expected validated and in the compute dtype (float32 or float64); the Woodbury path
    is taken when ``log_gamma`` is None or all zero, the per-token solver otherwise. With ``cu_seqlens``
    (B == 1) every document starts a chunk of its own, so no chunk straddles a boundary.

    Returns:
        ``o`` (B, T, H, Dv), or ``(o, (H_T, G_T))`` when ``output_final_state`` (leading dimension B,
        or the number of documents with ``cu_seqlens``).
    """
    B, T, H, Dk = q.shape
    lam = lam.expand(H, Dk)
    docs = None if cu_seqlens is None else Documents.from_cu_seqlens(cu_seqlens)
    h0, g0 = initial_states(q, v, initial_state, docs)
    woodbury = log_gamma is None or not bool((log_gamma != 0).any())
    longest = T if docs is None else max(docs.lengths)
    chunk = max(1, min(chunk_size, longest))
    o, h_t, g_t = _ChunkMesa.apply(q, k, v, lam, beta, log_gamma, h0, g0, chunk, woodbury, docs)
    if output_final_state:
        return o, (h_t, g_t)
    return o


# ----------------------------------------------------------------------------------------------
# Layout: (B, T, H, D) <-> (B*H, N, C, D). Without documents the row is cut into chunks and zero-padded
# to N*C tokens; with documents (B == 1) each document starts a chunk of its own and its last chunk is
# zero-padded, so that no chunk straddles a boundary (what flash-linear-attention's varlen kernels do
# too). Padded tokens have zero keys, values and queries, beta = 0 and log gamma = 0: they change no
# statistic.


class _Layout:
    """Where every token sits in the chunk layout, and where each document's state restarts and ends.

    A "document" without ``cu_seqlens`` is a whole batch row (one document, its state (B*H, ...));
    with ``cu_seqlens`` there are ``D`` documents in one row, each with its own initial and final state.

    Attributes:
        N: chunks, trailing empty ones included (see :meth:`pad_chunks`).
        starts: chunk -> document, for the first chunk of every non-empty document.
        ends: chunk -> document, for the last chunk of every non-empty document.
        empty: documents without tokens (final state = initial state).
        num_docs: D (1 without ``cu_seqlens``).
    """

    def __init__(self, B: int, T: int, chunk: int, docs: Documents | None, device: torch.device):
        self.B, self.T, self.chunk, self.device = B, T, chunk, device
        lengths = torch.tensor([T] if docs is None else docs.lengths, dtype=torch.long)
        counts = (lengths + chunk - 1) // chunk  # chunks per document
        firsts = counts.cumsum(0) - counts
        self.num_docs = len(lengths)
        nonempty = (counts > 0).nonzero()[:, 0].tolist()
        self.starts = {int(firsts[d]): d for d in nonempty}
        self.ends = {int(firsts[d] + counts[d] - 1): d for d in nonempty}
        self.empty = (counts == 0).nonzero()[:, 0].tolist()
        self.N = int(counts.sum())
        self.packed = docs is not None
        docs_of_chunks = torch.repeat_interleave(torch.arange(self.num_docs), counts)
        self._owner, self._after = docs_of_chunks, (firsts + counts)[docs_of_chunks]
        self._gather = self._position = None
        if self.packed:
            # Padded slot of every token, and source token of every padded slot (T: a zero row).
            doc = torch.repeat_interleave(torch.arange(self.num_docs), lengths)
            offsets = torch.tensor(docs.offsets[:-1], dtype=torch.long)
            position = firsts[doc] * chunk + torch.arange(T) - offsets[doc]
            slots = torch.full((self.N * chunk,), T, dtype=torch.long)
            slots[position] = torch.arange(T)
            self._gather, self._position = slots.to(device), position.to(device)

    def pad_chunks(self, N: int) -> None:
        """Appends empty chunks (after every document) up to ``N`` chunks."""
        if N > self.N and self.packed:
            pad = torch.full(((N - self.N) * self.chunk,), self.T, dtype=torch.long, device=self.device)
            self._gather = torch.cat([self._gather, pad])
        self.N = max(N, self.N)

    def doc_of_chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) document of every chunk (``num_docs`` for trailing empty chunks) and (N,) the chunk after
        that document's last one (N for trailing chunks)."""
        pad = self.N - len(self._owner)
        owner = F.pad(self._owner, (0, pad), value=self.num_docs)
        after = F.pad(self._after, (0, pad), value=self.N)
        return owner.to(self.device), after.to(self.device)

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, ...) -> (B*H, N, C, D), D the product of the trailing dimensions (1 for none)."""
        B, T, H = x.shape[:3]
        if self.packed:
            x = x.reshape(T, H, -1)
            x = torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, self._gather)
            return x.view(self.N, self.chunk, H, -1).permute(2, 0, 1, 3).contiguous()
        x = x.reshape(B, T, H, -1).transpose(1, 2)
        pad = self.N * self.chunk - T
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        # Contiguous: for B = 1 the reshape can be a strided view, which every matmul would copy again.
        return x.reshape(B * H, self.N, self.chunk, x.shape[-1]).contiguous()

    def from_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(B*H, N, C, D) -> (B, T, H, D)."""
        BH, N, C, D = x.shape
        if self.packed:
            return x.reshape(BH, N * C, D).index_select(1, self._position).transpose(0, 1).unsqueeze(0).contiguous()
        return x.reshape(self.B, BH // self.B, N * C, D)[:, :, : self.T].transpose(1, 2).contiguous()


class _Decay:
    """Within-chunk decay factors from log gamma, all ``<= 1`` so nothing overflows.

    ``step[t]`` is gamma_t itself, ``inside[t]`` the decay from the chunk start up to and including
    token t, ``outside[t]`` from after token t to the chunk end, ``total`` the whole chunk's and
    ``pair[t, i]`` the decay from after token i up to t (zero above the diagonal). Cumulative sums are taken in float64: in
    float32 a difference of two long sums loses digits that the pairwise decays need.
    """

    def __init__(self, log_gamma: torch.Tensor, dtype: torch.dtype):
        # Clamped so that a hard reset (gamma = 0, log gamma = -inf) gives zeros rather than inf - inf.
        log_gamma = log_gamma.to(torch.float64).clamp(min=-1e4)
        cum = log_gamma.cumsum(-1)
        C = cum.shape[-1]
        self.step = log_gamma.exp().to(dtype)
        causal = torch.ones(C, C, dtype=torch.bool, device=cum.device).tril()
        self.inside = cum.exp().to(dtype)
        self.outside = (cum[..., -1:] - cum).exp().to(dtype)
        self.total = self.inside[..., -1]
        diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
        self.pair = diff.exp().to(dtype)


def _causal(scores: torch.Tensor, decay: _Decay | None) -> torch.Tensor:
    """Masks (in place) a (..., C, C) score matrix to token pairs i <= t, with decay if any."""
    return scores.tril_() if decay is None else scores.mul_(decay.pair)


def _scan(updates: torch.Tensor, decay: torch.Tensor | None, init: torch.Tensor, reverse: bool = False):
    """State at each chunk boundary of ``S <- decay_n S + U_n`` (or its adjoint when reversed).

    Args:
        updates: (BH, N, a, b) per-chunk contributions ``U_n``.
        decay: (BH, N) whole-chunk decays, or None for no forgetting.
        init: (BH, a, b) state before the first chunk (after the last one when ``reverse``).
        reverse: run from the last chunk to the first (gradient accumulation).

    Returns:
        ``(states, final)``: ``states[:, n]`` is the state entering chunk n (forward) or the
        adjoint of the state leaving chunk n (reverse); ``final`` the state after the sweep.
    """
    # A Python loop over chunks: torch.cumsum over a non-innermost dimension of small matrices is
    # several times slower on CPU, and the loop also covers the decayed case.
    states = torch.empty_like(updates)
    s = init
    order = range(updates.shape[1] - 1, -1, -1) if reverse else range(updates.shape[1])
    for n in order:
        states[:, n] = s
        s = updates[:, n] + (s if decay is None else s * decay[:, n, None, None])
    return states, s


def _scan_documents(updates: torch.Tensor, decay: torch.Tensor | None, init: torch.Tensor, layout: _Layout):
    """:func:`_scan` over the documents of a layout, each restarting from its own initial state.

    Args:
        updates, decay: as for :func:`_scan`, over the layout's N chunks.
        init: (D, BH, a, b) initial state of every document.

    Returns:
        ``(states, final)``: (BH, N, a, b) states entering every chunk and (D, BH, a, b) every document's
        final state (its initial state if it is empty).
    """
    states = torch.empty_like(updates)
    final = init.clone()
    s = init[0]
    for n in range(updates.shape[1]):
        if n in layout.starts:
            s = init[layout.starts[n]]
        states[:, n] = s
        s = updates[:, n] + (s if decay is None else s * decay[:, n, None, None])
        if n in layout.ends:
            final[layout.ends[n]] = s
    return states, final


def _scan_documents_adjoint(updates: torch.Tensor, decay: torch.Tensor | None, d_final: torch.Tensor, layout: _Layout):
    """Reverse of :func:`_scan_documents`: the adjoints of the states leaving every chunk, and of every
    document's initial state, from the per-chunk adjoint contributions and the final states' adjoints.

    Returns:
        ``(states, d_init)``: (BH, N, a, b) and (D, BH, a, b).
    """
    states = torch.empty_like(updates)
    d_init = torch.zeros_like(d_final)
    for d in layout.empty:
        d_init[d] = d_final[d]  # an empty document hands its initial state on unchanged
    s = torch.zeros_like(d_final[0])
    for n in range(updates.shape[1] - 1, -1, -1):
        if n in layout.ends:
            s = d_final[layout.ends[n]]  # the next document restarted: nothing flows back across the boundary
        states[:, n] = s
        s = updates[:, n] + (s if decay is None else s * decay[:, n, None, None])
        if n in layout.starts:
            d_init[layout.starts[n]] = s
    return states, d_init


def _chunk_updates(x: torch.Tensor, k: torch.Tensor, decay: _Decay | None) -> torch.Tensor:
    """Per-chunk state contribution ``sum_i (decay to chunk end) x_i k_i^T``: (BH, N, Dx, Dk)."""
    if decay is not None:
        x = x * decay.outside[..., None]
    return x.mT @ k


# ----------------------------------------------------------------------------------------------
# Solvers for x_t = (H_t + Lambda)^{-1} r_t for all tokens at once.


def _spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of symmetric positive definite matrices, Cholesky first, LU as fallback."""
    factor, info = torch.linalg.cholesky_ex(a)
    if bool(info.any()):  # lost definiteness to rounding (extreme scales): LU still inverts
        return torch.linalg.inv(a)
    return torch.cholesky_inverse(factor)


def _leaf_step(p: torch.Tensor, leaf: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """One Woodbury leaf on a batch of inverses ``p``: returns ``W^T`` and downdates ``p`` in place.

    ``M = I + K P K^T = U^T U``; ``W = U^{-T} K P``, taken as the right-hand solve ``W^T U = (K P)^T`` because
    LAPACK runs that layout about three times faster than the left-hand one here; ``P <- P - W^T W``.
    """
    kp = leaf @ p
    upper = torch.linalg.cholesky_ex(torch.baddbmm(eye, kp, leaf.mT), upper=True)[0]
    w_leaf_t = torch.linalg.solve_triangular(upper, kp.mT, upper=True, left=False)
    p.baddbmm_(w_leaf_t, w_leaf_t.mT, alpha=-1)
    return w_leaf_t


def _woodbury_factors(
    ks: torch.Tensor, lam: torch.Tensor, h_starts: torch.Tensor, chunks_per_block: int, restarts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse at every chunk start and the Woodbury rows ``W`` of every chunk (gamma = 1).

    Within a chunk, ``(H_t + Lambda)^{-1} = P - W_{<=t}^T W_{<=t}`` where ``P`` is the inverse at the
    chunk start, ``M = I + K P K^T = R R^T`` and ``W = R^{-1} K P``: a leading block of a Cholesky
    factor is the factor of the leading block, so one factor serves every token of the chunk.
    Leaves of ``LEAF_SIZE`` keys are factored one after the other and ``P`` is downdated between
    them; blocks of chunks run in parallel from an exact inverse at their start, and a chunk that
    begins a document restarts from the exact inverse of that document's initial state.

    Args:
        ks: (BH, N, C, Dk) keys scaled by ``sqrt(beta)``.
        lam: (BH, Dk) diagonal regulariser.
        h_starts: (BH, N, Dk, Dk) statistic ``H`` entering every chunk.
        chunks_per_block: chunks handled sequentially per block (N is a multiple).
        restarts: chunks other than block starts whose inverse is computed exactly (document starts).

    Returns:
        ``(p, w)``: (BH, N, Dk, Dk) inverses at chunk starts and (BH, N, C, Dk) rows ``W``.
    """
    BH, N, C, Dk = ks.shape
    blocks = N // chunks_per_block
    exact = sorted(set(range(0, N, chunks_per_block)) | {n for n in restarts if n % chunks_per_block})
    a = h_starts[:, exact]
    a.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    p_exact = _lapack(_spd_inverse, a)  # (BH, len(exact), Dk, Dk)
    where = {n: i for i, n in enumerate(exact)}
    p = p_exact[:, [where[n] for n in range(0, N, chunks_per_block)]].reshape(BH * blocks, Dk, Dk)
    ks = ks.view(BH, blocks, chunks_per_block, C, Dk)
    p_starts = ks.new_empty(BH, blocks, chunks_per_block, Dk, Dk)
    w = torch.empty_like(ks)
    eye = {}
    for j in range(chunks_per_block):
        reset = [b for b in range(blocks) if j and b * chunks_per_block + j in where]
        if reset:
            p.view(BH, blocks, Dk, Dk)[:, reset] = p_exact[:, [where[b * chunks_per_block + j] for b in reset]]
        p_starts[:, :, j] = p.view(BH, blocks, Dk, Dk)
        for r0 in range(0, C, LEAF_SIZE):
            r1 = min(r0 + LEAF_SIZE, C)
            if r1 - r0 not in eye:
                eye[r1 - r0] = torch.eye(r1 - r0, dtype=ks.dtype, device=ks.device)
            leaf = ks[:, :, j, r0:r1].reshape(BH * blocks, r1 - r0, Dk)
            # p_starts holds copies, so the in-place downdate of p is safe.
            w_leaf_t = _lapack(_leaf_step, p, leaf, eye[r1 - r0].expand(BH * blocks, -1, -1), dim=0)
            w[:, :, j, r0:r1] = w_leaf_t.mT.view(BH, blocks, r1 - r0, Dk)
    return p_starts.view(BH, N, Dk, Dk), w.view(BH, N, C, Dk)


def _woodbury_solve(rhs: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows ``(H_t + Lambda)^{-1} r_t`` of a chunk: ``R P - tril(R W^T) W``."""
    shape = rhs.shape
    rhs, p, w = rhs.flatten(0, 1), p.flatten(0, 1), w.flatten(0, 1)
    return (rhs @ p).baddbmm_((rhs @ w.mT).tril_(), w, alpha=-1).view(shape)


def _direct_solve(
    rhs: torch.Tensor,
    k: torch.Tensor,
    beta: torch.Tensor | None,
    lam: torch.Tensor,
    h_starts: torch.Tensor,
    decay: _Decay,
) -> torch.Tensor:
    """Rows ``(H_t + Lambda)^{-1} r_t`` with every token's matrix formed and solved (gated path).

    Every token's ``H_t`` is formed by running ``H_t = gamma_t H_{t-1} + beta_t k_t k_t^T`` through
    the chunk, for a few chunks at a time (at most ``SOLVE_GROUP_ELEMENTS`` matrix entries) so the
    matrices never exist for the whole sequence. The scan costs O(Dk^2) per token; forming the same
    matrices as one product of the (C, C) decay weights with the key outer products costs O(C Dk^2)
    and was measured slower than the solves themselves.
    """
    BH, N, C, Dk = k.shape
    group = max(1, SOLVE_GROUP_ELEMENTS // (BH * C * Dk * Dk))
    kb = k if beta is None else k * beta[..., None]
    out = torch.empty_like(rhs)
    for n0 in range(0, N, group):
        n1 = min(n0 + group, N)
        a = k.new_empty(BH, n1 - n0, C, Dk, Dk)
        h = h_starts[:, n0:n1]
        for t in range(C):
            h = torch.addcmul(
                h * decay.step[:, n0:n1, t, None, None],
                kb[:, n0:n1, t, :, None],
                k[:, n0:n1, t, None, :],
                out=a[:, :, t],
            )
        a.diagonal(dim1=-2, dim2=-1).add_(lam[:, None, None, :])
        out[:, n0:n1] = torch.linalg.solve(a, rhs[:, n0:n1, :, :, None])[..., 0]
    return out


def _eig_subchunk(chunk: int) -> int:
    """Sub-chunk size for the eigen-Woodbury solver (a divisor of the chunk), 0 to solve directly."""
    sub = max((d for d in range(1, min(EIG_SUBCHUNK, chunk) + 1) if chunk % d == 0), default=1)
    return sub if sub >= 4 else 0


class _EigBases(NamedTuple):
    """Eigendecomposition ``D H_s D = U S U^T`` at every sub-chunk start (``D = Lambda^{-1/2}``), computed in the
    forward pass and kept for the backward solve: (Dk^2 + 2 Dk) numbers per sub-chunk and token."""

    s: torch.Tensor  # (BH, M, Dk) eigenvalues, clamped at 0
    u: torch.Tensor  # (BH, M, Dk, Dk) eigenvectors
    keys: torch.Tensor  # (BH, M, sub, Dk) scaled keys of the sub-chunk in its eigenbasis, (D k_i)^T U


def _eig_bases(
    k: torch.Tensor, kb: torch.Tensor, lam: torch.Tensor, log_gamma: torch.Tensor, h_starts: torch.Tensor, sub: int
) -> _EigBases:
    """The sub-chunk states rebuilt from the chunk states, and their eigendecompositions, a few chunks at a time
    (``SOLVE_GROUP_ELEMENTS``) so that only the kept decompositions grow with the whole sequence.

    Args:
        k, kb: (BH, N, C, Dk) keys and written keys ``beta k``. lam: (BH, Dk). log_gamma: (BH, N, C).
        h_starts: (BH, N, Dk, Dk) statistic at the chunk starts.
        sub: tokens per sub-chunk, a divisor of C.
    """
    BH, N, C, Dk = k.shape
    per_chunk = C // sub
    scale = lam.rsqrt()
    s = k.new_empty(BH, N * per_chunk, Dk)
    u = k.new_empty(BH, N * per_chunk, Dk, Dk)
    group = max(1, SOLVE_GROUP_ELEMENTS // (BH * per_chunk * Dk * Dk))
    for n0 in range(0, N, group):
        n = slice(n0, min(n0 + group, N))
        m = slice(n.start * per_chunk, n.stop * per_chunk)
        decay = _Decay(log_gamma[:, n].reshape(-1, per_chunk, sub), k.dtype)
        updates = _chunk_updates(
            kb[:, n].reshape(-1, per_chunk, sub, Dk), k[:, n].reshape(-1, per_chunk, sub, Dk), decay
        )
        starts, _ = _scan(updates, decay.total, h_starts[:, n].reshape(-1, Dk, Dk))
        del updates
        starts = starts.view(BH, -1, Dk, Dk).mul_(scale[:, None, :, None]).mul_(scale[:, None, None, :])
        s[:, m], u[:, m] = _lapack(torch.linalg.eigh, starts)
    keys = (k.reshape(BH, N * per_chunk, sub, Dk) * scale[:, None, None, :]) @ u
    return _EigBases(s.clamp_min_(0), u, keys)  # H is positive semidefinite; rounding can leave -eps eigenvalues


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the process that made it, the pool)
_POOL_LOCK = threading.Lock()


def _lapack(fn, *args, dim: int = 1):
    """``fn(*args)`` for batched small LAPACK (or BLAS) problems, the batch (dimension ``dim``) split across the
    CPU threads.

    torch runs a batch of small LAPACK problems (and in-place batched products of a few matrices) one after the
    other, and MKL threads each small problem internally, which on a machine whose other cores are busy makes
    every parallel region wait for a descheduled thread (64 x 64 ``eigh`` measured 8 to 20 times slower with two
    intra-op threads than with one; the Woodbury leaves' triangular solves and downdates alike).
    Here each of ``torch.get_num_threads()`` Python threads solves a slice of the batch with one intra-op
    thread (torch releases the GIL inside the call). Elsewhere than on CPU, or with one thread, ``fn(*args)``.
    """
    threads = torch.get_num_threads()
    M = args[0].shape[dim]
    if args[0].device.type != "cpu" or threads == 1 or M < threads:
        return fn(*args)
    global _POOL
    with _POOL_LOCK:  # the intra-op thread count is process-wide: one such section at a time
        # A forked child inherits the pool object but not its threads: it gets a pool of its own.
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1]._max_workers < threads:
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mesa-lapack"))
        pool = _POOL[1]
        bounds = [M * i // threads for i in range(threads + 1)]
        torch.set_num_threads(1)
        try:
            parts = [
                pool.submit(fn, *(a.narrow(dim, lo, hi - lo) for a in args))
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            parts = [f.result() for f in parts]
        finally:
            torch.set_num_threads(threads)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, dim=dim) for p in zip(*parts, strict=True))
    return torch.cat(parts, dim=dim)


def _token_blocks(sub: int) -> list[tuple[int, int]]:
    """Blocks of a sub-chunk's tokens that share a capacitance size: token t reads keys i <= t only, so the tokens of
    block ``[t0, t1)`` need the leading ``t1 x t1`` block of the capacitance matrix."""
    step = max(1, -(-sub // CAPACITANCE_BLOCKS))
    return [(t0, min(t0 + step, sub)) for t0 in range(0, sub, step)]


def _eig_woodbury_solve(
    rhs: torch.Tensor,
    bases: _EigBases,
    beta: torch.Tensor | None,
    lam: torch.Tensor,
    log_gamma: torch.Tensor,
    sub: int,
) -> torch.Tensor:
    """Rows ``(H_t + Lambda)^{-1} r_t`` for gated inputs, exactly, from the eigendecomposition at each sub-chunk start.

    In the basis scaled by ``D = Lambda^{-1/2}`` the undecayed regulariser is the identity. For token t of a
    sub-chunk that starts in state ``H_s``, with ``e_t`` the decay since the start and ``D H_s D = U S U^T``,

        D (H_t + Lambda) D = U (I + e_t S) U^T + F_t^T F_t,   F_t = rows sqrt(pair[t, i] beta_i) (D k_i)^T, i <= t,

    whose first term is diagonal in the eigenbasis for every t. Woodbury then needs only a capacitance matrix
    ``I + F_t B_t^{-1} F_t^T`` (at most sub x sub) per token, ``B_t = I + e_t S``: O(t^2 Dk) per token in batched
    products plus one small factorisation. A few chunks at a time (``SOLVE_GROUP_ELEMENTS``).

    Args:
        rhs: (BH, N, C, Dk) right-hand sides.
        bases: the sub-chunk eigendecompositions from :func:`_eig_bases`.
        beta: (BH, N, C) or None. lam: (BH, Dk). log_gamma: (BH, N, C).
        sub: tokens per sub-chunk, a divisor of C.
    """
    BH, N, C, Dk = rhs.shape
    per_chunk = C // sub
    scale = lam.rsqrt()[:, None, None, :]  # D, as a row scaling
    group = max(1, SOLVE_GROUP_ELEMENTS // (BH * C * sub * Dk))
    out = torch.empty_like(rhs)
    for n0 in range(0, N, group):
        n = slice(n0, min(n0 + group, N))
        M = (n.stop - n.start) * per_chunk  # sub-chunks in this group, per batch and head
        m = slice(n.start * per_chunk, n.stop * per_chunk)
        decay = _Decay(log_gamma[:, n].reshape(BH, M, sub), rhs.dtype)
        s, u, keys = bases.s[:, m], bases.u[:, m], bases.keys[:, m]
        weights = decay.pair if beta is None else decay.pair * beta[:, n].reshape(BH, M, 1, sub)
        weights = weights.sqrt_()  # (BH, M, t, i)
        b_inv = (decay.inside[..., None] * s[:, :, None, :]).add_(1.0).reciprocal_()  # B_t^{-1}: (BH, M, t, Dk)
        z = b_inv * ((rhs[:, n].reshape(BH, M, sub, Dk) * scale) @ u)  # B_t^{-1} r_t in the eigenbasis
        small = (z @ keys.mT) * weights  # F_t B_t^{-1} r_t: (BH, M, t, i)
        solved = torch.zeros_like(small)
        for t0, t1 in _token_blocks(sub):
            # Capacitance I + F_t B_t^{-1} F_t^T for the block's tokens at once: B_t^{-1} changes with t only
            # through its diagonal, so one product with the pairwise key products k_i * k_j gives all of them.
            pairs = (keys[:, :, :t1, None, :] * keys[:, :, None, :t1, :]).view(BH, M, t1 * t1, Dk)
            capacitance = (b_inv[:, :, t0:t1] @ pairs.mT).view(BH, M, t1 - t0, t1, t1)
            del pairs
            w = weights[:, :, t0:t1, :t1]
            capacitance *= w[..., :, None] * w[..., None, :]
            capacitance.diagonal(dim1=-2, dim2=-1).add_(1.0)
            factor = _lapack(_cholesky, capacitance)
            del capacitance
            solved[:, :, t0:t1, :t1] = _lapack(torch.cholesky_solve, small[:, :, t0:t1, :t1, None], factor)[..., 0]
        z = z - b_inv * ((solved * weights) @ keys)
        out[:, n] = ((z @ u.mT) * scale).view(BH, -1, C, Dk)
    return out


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky_ex(a)[0]


# ----------------------------------------------------------------------------------------------


class _ChunkMesa(torch.autograd.Function):
    """Chunkwise mesa attention with a hand-written backward pass.

    Saved for backward: the chunked keys, values and gates, the solutions ``X`` (T x Dk), the value statistic at
    chunk starts, and the inverses at chunk starts with the rows ``W`` (Woodbury path), the sub-chunk
    eigendecompositions (gated) or the key statistic at chunk starts (direct fallback): O(T Dk + T Dk^2 / C) in all,
    with C = 16 for the gated decompositions; nothing of size T x Dk x Dk.
    """

    @staticmethod
    def forward(ctx, q, k, v, lam, beta, log_gamma, h0, g0, chunk, woodbury, docs):
        # Everything runs in the inputs' dtype (float32 or float64): autocast would put products in bf16.
        with torch.autocast(q.device.type, enabled=False):
            return _ChunkMesa._forward(ctx, q, k, v, lam, beta, log_gamma, h0, g0, chunk, woodbury, docs)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dh_t, dg_t):
        # backward() is often called inside the training step's autocast region, which would apply here.
        with torch.autocast(do.device.type, enabled=False):
            return _ChunkMesa._backward(ctx, do, dh_t, dg_t)

    @staticmethod
    def _forward(ctx, q, k, v, lam, beta, log_gamma, h0, g0, chunk, woodbury, docs):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        BH = B * H
        layout = _Layout(B, T, chunk, docs, q.device)
        per_block = 1
        if woodbury:
            # Blocks of chunks share one exact inverse at their start; pad N to whole blocks. (A block
            # length balancing the per-block inverses against the sequential steps measured no faster.)
            leaves = -(-chunk // LEAF_SIZE)
            per_block = min(layout.N, max(1, MAX_STEPS_PER_BLOCK // leaves))
            blocks = -(-layout.N // per_block)
            per_block = -(-layout.N // blocks)
            layout.pad_chunks(blocks * per_block)
        N = layout.N
        qc, kc, vc = (layout.to_chunks(x) for x in (q, k, v))
        bc = None if beta is None else layout.to_chunks(beta)[..., 0]
        lgc = None if log_gamma is None else layout.to_chunks(log_gamma)[..., 0]
        decay = None if lgc is None else _Decay(lgc, q.dtype)
        total = None if decay is None else decay.total
        lam_bh = lam.repeat(B, 1)
        # Initial states per document: (D, BH, ...), D = 1 without cu_seqlens (then BH rows of one "document").
        h0, g0 = h0.reshape(layout.num_docs, BH, Dk, Dk), g0.reshape(layout.num_docs, BH, Dv, Dk)
        kb = kc if bc is None else kc * bc[..., None]  # written keys, beta_i k_i

        g_starts, g_t = _scan_documents(_chunk_updates(vc, kb, decay), total, g0, layout)
        h_starts, h_t = _scan_documents(_chunk_updates(kb, kc, decay), total, h0, layout)
        p_starts = w = eig = None
        if woodbury:
            ks = kc if bc is None else kc * bc.sqrt()[..., None]
            p_starts, w = _woodbury_factors(ks, lam_bh, h_starts, per_block, list(layout.starts))
            h_starts = None
            x = _woodbury_solve(qc, p_starts, w)
        else:
            sub = _eig_subchunk(chunk)
            if sub:
                eig = _eig_bases(kc, kb, lam_bh, lgc, h_starts, sub)  # kept for the backward solve
                x = _eig_woodbury_solve(qc, eig, bc, lam_bh, lgc, sub)
            else:
                x = _direct_solve(qc, kc, bc, lam_bh, h_starts, decay)
        del qc  # large temporaries go as soon as they are used: peak memory is a few (T, H, D) tensors

        # o_t = G_t x_t: the state at the chunk start plus the chunk's own writes up to t.
        o = x @ g_starts.mT
        if decay is not None:
            o *= decay.inside[..., None]
        scores = _causal(x @ kb.mT, decay)
        o = o.flatten(0, 1).baddbmm_(scores.flatten(0, 1), vc.flatten(0, 1)).view(BH, N, chunk, Dv)
        del scores

        ctx.save_for_backward(kc, vc, bc, lgc)
        # Intermediates live on ctx; the final states serve only the log-gamma gradient.
        final = None if decay is None else (h_t.clone(), g_t.clone())
        ctx.solver = (x, g_starts, p_starts, w, h_starts if eig is None else None, eig, lam_bh, final)
        ctx.layout = layout
        lead = B if docs is None else layout.num_docs
        return layout.from_chunks(o), h_t.view(lead, H, Dk, Dk), g_t.view(lead, H, Dv, Dk)

    @staticmethod
    def _backward(ctx, do, dh_t, dg_t):
        kc, vc, bc, lgc = ctx.saved_tensors
        x, g_starts, p_starts, w, h_starts, eig, lam_bh, final = ctx.solver
        layout = ctx.layout
        B = layout.B
        BH, N, C, Dk = kc.shape
        H, D, Dv = BH // B, layout.num_docs, vc.shape[-1]
        decay = None if lgc is None else _Decay(lgc, kc.dtype)
        total = None if decay is None else decay.total
        doc = layout.to_chunks(do.to(kc.dtype))
        kb = kc if bc is None else kc * bc[..., None]

        # dx_t = G_t^T do_t, a linear-attention read of the value statistic.
        dov = _causal(doc @ vc.mT, decay)  # [t, i] = decay * (do_t . v_i)
        dx = doc @ g_starts
        if decay is not None:
            dx *= decay.inside[..., None]
        dx = dx.flatten(0, 1).baddbmm_(dov.flatten(0, 1), kb.flatten(0, 1)).view(BH, N, C, Dk)

        # dq_t = y_t = (H_t + Lambda)^{-1} dx_t, with the same matrices as the forward solve.
        if p_starts is not None:
            y = _woodbury_solve(dx, p_starts, w)
        elif eig is not None:
            y = _eig_woodbury_solve(dx, eig, bc, lam_bh, lgc, _eig_subchunk(C))
        else:
            y = _direct_solve(dx, kc, bc, lam_bh, h_starts, decay)

        # Adjoints of the statistics, dL/dG_t = do_t x_t^T and dL/dH_t = -y_t x_t^T, accumulated
        # backwards through the decays: rg/rh[:, n] are the adjoints of the states leaving chunk n.
        do_in, y_in = (doc, y) if decay is None else (doc * decay.inside[..., None], y * decay.inside[..., None])
        dg_end = kc.new_zeros(D, BH, Dv, Dk) if dg_t is None else dg_t.reshape(D, BH, Dv, Dk).to(kc.dtype)
        dh_end = kc.new_zeros(D, BH, Dk, Dk) if dh_t is None else dh_t.reshape(D, BH, Dk, Dk).to(kc.dtype)
        rg, dg0 = _scan_documents_adjoint(do_in.mT @ x, total, dg_end, layout)
        rh, dh0 = _scan_documents_adjoint(-(y_in.mT @ x), total, dh_end, layout)
        del do_in, y_in, dx
        # Per token, with Zg_t, Zh_t the accumulated adjoints: zg_k = Zg_t k_t, zh_k = Zh_t k_t,
        # zg_v = Zg_t^T v_t and zh_tk = Zh_t^T k_t. Pairs inside the chunk come from (C, C) score
        # matrices, later chunks through rg/rh; each (C, C) matrix is dropped once used.
        scale = None if decay is None else decay.outside[..., None]
        zg_v = vc @ rg
        zg_k = kc @ rg.mT
        zh_k = kc @ rh.mT
        zh_tk = kc @ rh
        del rg, rh
        if scale is not None:
            for z in (zg_v, zg_k, zh_k, zh_tk):
                z *= scale
        zg_v += dov.mT @ x
        del dov
        xk = _causal(x @ kc.mT, decay)
        zg_k += xk.mT @ doc
        zh_k -= xk.mT @ y
        del xk, doc
        yk = _causal(y @ kc.mT, decay)
        zh_tk -= yk.mT @ x
        del yk

        dk = zg_v.add_(zh_k).add_(zh_tk)
        if bc is not None:
            db_tok = (vc * zg_k).sum(-1) + (kc * zh_k).sum(-1)
            dk *= bc[..., None]
        dv = zg_k if bc is None else zg_k * bc[..., None]
        dlam = -(y * x).sum((1, 2)).view(B, H, Dk).sum(0)
        dlog_gamma = None
        if lgc is not None:
            # dL/dGamma_t for the cumulative log decay Gamma_t is lam x_t . y_t (from the undecayed
            # regulariser) minus beta_t dL/dbeta_t; summed over t >= s it is dL/dlog gamma_s.
            d_cum = (lam_bh[:, None, None, :] * x * y).sum(-1)
            if bc is not None:
                d_cum -= bc * db_tok
            else:
                d_cum -= (vc * zg_k).sum(-1) + (kc * zh_k).sum(-1)
            # Summed within each document only: a restart cuts every decay across the boundary.
            owner, after = layout.doc_of_chunk()
            d_lg = d_cum.flatten(1).flip(-1).cumsum(-1).flip(-1)
            d_lg = d_lg.view(BH, N, C) - F.pad(d_lg, (0, 1))[:, after * C, None]
            # A final state read by the loss depends on every log gamma of its document through its whole decay.
            read = (dh_end * final[0]).sum((-2, -1)) + (dg_end * final[1]).sum((-2, -1))  # (D, BH)
            d_lg += F.pad(read, (0, 0, 0, 1))[owner].T[..., None]
            dlog_gamma = layout.from_chunks(d_lg[..., None])[..., 0]
        lead = D if layout.packed else B
        return (
            layout.from_chunks(y),
            layout.from_chunks(dk),
            layout.from_chunks(dv),
            dlam,
            None if bc is None else layout.from_chunks(db_tok[..., None])[..., 0],
            dlog_gamma,
            dh0.view(lead, H, Dk, Dk),
            dg0.view(lead, H, Dv, Dk),
            None,
            None,
            None,
        )
