"""Packed sequences: several documents in one row, described by their offsets ``cu_seqlens``.

Language-model training packs documents back to back into one row of length ``T`` instead of padding each to the
longest. ``cu_seqlens`` is the 1-D integer tensor of document offsets ``[0, l_1, l_1 + l_2, ..., T]`` (the
convention of flash-attention and flash-linear-attention): document ``i`` is tokens ``cu_seqlens[i]`` to
``cu_seqlens[i + 1] - 1``. Every layer that takes ``cu_seqlens`` treats each document as a fresh sequence: recurrent
states and the short convolution restart at each document start, softmax attention stays within each document, and
rotary positions count from 0 in each document.

Hugging Face's ``DataCollatorWithFlattening`` describes the same packing by ``position_ids`` that restart at 0 for
every document; :func:`cu_seqlens_from_position_ids` turns those into offsets. :func:`check_cu_seqlens` (the op's
own check, ``check_cu_seqlens(cu_seqlens, B, T)``) rejects offsets that do not fit an input.
"""

from __future__ import annotations

import torch

from .ops.packing import check_cu_seqlens

__all__ = ["check_cu_seqlens", "cu_seqlens_from_position_ids", "document_positions"]


def document_positions(cu_seqlens: torch.Tensor, total_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which document each token of the packed row belongs to, and its position in that document.

    Args:
        cu_seqlens: Checked document offsets (see :func:`check_cu_seqlens`); empty documents are allowed.
        total_len: ``T``, the length of the packed row.

    Returns:
        ``(document, position)``, two int64 tensors of shape (T,): token ``t`` is token ``position[t]`` of document
        ``document[t]``. Empty documents own no token.
    """
    offsets = cu_seqlens.to(torch.long)
    t = torch.arange(total_len, device=cu_seqlens.device)
    # The last offset <= t starts t's document; an empty document's offset equals the next one's and is skipped.
    document = torch.searchsorted(offsets, t, right=True) - 1
    return document, t - offsets[document]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document offsets of a packed row from positions that restart at 0 for every document.

    This is how ``transformers.DataCollatorWithFlattening`` describes packing: ``position_ids = [[0, 1, 2, 0, 1, 0,
    1, 2, 3]]`` gives ``cu_seqlens = [0, 3, 5, 9]``.

    Args:
        position_ids: (1, T) or (T,) integer positions: 0 at each document start, counting up by one within it.

    Returns:
        int32 offsets ``[0, l_1, ..., T]`` on the device of ``position_ids``.

    Raises:
        ValueError: If there is more than one row, the first position is not 0, or the positions do not count up by
            one within each document.
    """
    if position_ids.dim() == 2:
        if position_ids.shape[0] != 1:
            raise ValueError(
                f"packed position_ids come in one row, got shape {tuple(position_ids.shape)}; each row would "
                "be a separate packed batch"
            )
        position_ids = position_ids[0]
    if position_ids.dim() != 1 or position_ids.numel() == 0:
        raise ValueError(f"position_ids must have shape (1, T) with T > 0, got {tuple(position_ids.shape)}")
    starts = position_ids == 0
    steps_ok = (position_ids[1:] == position_ids[:-1] + 1) | starts[1:]
    if not (starts[0] & steps_ok.all()).item():
        raise ValueError(
            "packed position_ids must be 0 at each document start and count up by one within the document "
            f"(e.g. [0, 1, 2, 0, 1]), got {position_ids.tolist()[:32]}{' ...' if position_ids.numel() > 32 else ''}"
        )
    T = position_ids.numel()
    boundaries = starts.nonzero().flatten()
    end = torch.tensor([T], device=position_ids.device, dtype=boundaries.dtype)
    return torch.cat([boundaries, end]).to(torch.int32)
