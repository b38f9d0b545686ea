"""Packed sequences: documents laid end to end in one row, described by ``cu_seqlens``.

``cu_seqlens = [0, l_1, l_1 + l_2, ..., T]`` (flash-linear-attention's convention) cuts a (1, T, ...) row into
documents; every statistic restarts at a document's first token, from that document's initial state (or zeros).
Empty documents (two equal offsets) are allowed: they read nothing and their final state is their initial state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Documents:
    """Document boundaries on the host, read once from ``cu_seqlens``.

    Attributes:
        offsets: ``cu_seqlens`` as Python ints, ``offsets[n]`` to ``offsets[n + 1]`` being document n.
        starts: token index -> document, for every non-empty document's first token.
        ends: token index -> document, for every non-empty document's last token.
    """

    offsets: tuple[int, ...]
    starts: dict[int, int]
    ends: dict[int, int]

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> Documents:
        offsets = tuple(int(x) for x in cu_seqlens.tolist())
        starts = {a: n for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)) if b > a}
        ends = {b - 1: n for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)) if b > a}
        return cls(offsets, starts, ends)

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> int:
    """Validates ``cu_seqlens`` for a (B, T, ...) input and returns the number of documents.

    Raises:
        TypeError: For a non-tensor or a non-integer tensor.
        ValueError: For B != 1, a wrong shape, or offsets that do not run from 0 to T without decreasing.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must hold integers (e.g. torch.int32 or torch.int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least two offsets [0, ..., T], got shape {tuple(cu_seqlens.shape)}"
        )
    if B != 1:
        raise ValueError(
            f"cu_seqlens needs the documents packed into one row (B == 1), got B = {B}; concatenate the rows "
            "along time and pass their offsets"
        )
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got {offsets[0]} ... {offsets[-1]}")
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:], strict=True)):
        raise ValueError(f"cu_seqlens must not decrease (document lengths are its differences), got {offsets}")
    return len(offsets) - 1


def initial_states(
    q: torch.Tensor, v: torch.Tensor, initial_state: tuple[torch.Tensor, torch.Tensor] | None, docs: Documents | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H_0, G_0)`` with a leading dimension of B (or of the documents): zeros when none are given, and only the
    symmetric part of a given ``H_0``, the only part a statistic can have."""
    B, _, H, Dk = q.shape
    lead = B if docs is None else docs.count
    if initial_state is None:
        return q.new_zeros(lead, H, Dk, Dk), q.new_zeros(lead, H, v.shape[-1], Dk)
    h0, g0 = initial_state
    return (h0 + h0.mT) / 2, g0
