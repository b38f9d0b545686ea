"""The mesa-layer as a drop-in replacement for causal self-attention.

Per head, token t's output is the prediction of a ridge-regression model fitted, at test time, to the
keys and values seen so far: ``o_t = G_t (H_t + Lambda)^{-1} q_t`` with ``H_t = sum k k^T`` and
``G_t = sum v k^T`` (see :func:`mesa_module.mesa_attention`). This module owns what surrounds that op:
projections, the optional short convolution, the optional input/forget gates, the learned regulariser,
the output norm, padding and write masks, packed documents (``cu_seqlens``), and the recurrent state used to stream
and decode.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import mesa_attention
from .packing import check_cu_seqlens, document_positions

__all__ = ["MesaLayer", "MesaState", "ShortConvolution"]

_METHODS = ("auto", "naive", "chunk", "recurrent")


class MesaState(NamedTuple):
    """Recurrent state of a :class:`MesaLayer`, enough to continue a sequence exactly.

    Attributes:
        h: Key statistics ``H`` of shape (B, H, Dk, Dk), float32 or wider.
        g: Value-key statistics ``G`` of shape (B, H, Dv, Dk), float32 or wider.
        conv: The last ``conv_size - 1`` inputs of the short convolution, shape (B, conv_size - 1, 2 * H * Dk),
            or ``None`` when the layer has no short convolution.
    """

    h: torch.Tensor
    g: torch.Tensor
    conv: torch.Tensor | None = None

    def detach(self) -> MesaState:
        """Returns the same state cut from the autograd graph (for truncated backpropagation through time)."""
        return MesaState(*(None if t is None else t.detach() for t in self))


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time followed by SiLU, with a streaming state.

    Args:
        channels: Number of channels, each convolved with its own kernel.
        kernel_size: Number of taps; token t sees tokens ``t - kernel_size + 1 .. t``.
        bias: Whether to add a learned bias per channel.
    """

    def __init__(self, channels: int, kernel_size: int = 4, *, bias: bool = False):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        bound = 1.0 / math.sqrt(kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolves ``x`` (B, T, C), continuing from ``state`` (B, kernel_size - 1, C) if given.

        Args:
            x: Input of shape (B, T, C).
            state: The previous call's last ``kernel_size - 1`` inputs; zeros (a fresh sequence) if ``None``. With
                ``cu_seqlens``, one per document: (N, kernel_size - 1, C).
            lengths: Per-sequence number of valid leading tokens in ``x`` (B,); the new state ends at the last
                valid token. ``None`` means all T tokens are valid.
            cu_seqlens: Offsets ``[0, l_1, ..., T]`` of documents packed into one row (B = 1, already checked, see
                :mod:`mesa_module.packing`): no token sees another document's inputs, and the new state has one
                entry per document.

        Returns:
            ``(y, new_state)`` with ``y`` of shape (B, T, C).
        """
        if cu_seqlens is not None:
            return self._forward_packed(x, state, cu_seqlens)
        B, T, C = x.shape
        width = self.kernel_size - 1
        if state is None:
            state = x.new_zeros(B, width, C)
        padded = torch.cat([state.to(x.dtype), x], dim=1)  # (B, width + T, C)
        y = self._convolve(padded)
        if lengths is None:
            new_state = padded[:, T:]
        else:
            index = lengths[:, None] + torch.arange(width, device=x.device)
            new_state = padded.gather(1, index[..., None].expand(B, width, C))
        return y, new_state

    def _convolve(self, padded: torch.Tensor) -> torch.Tensor:
        """SiLU of the valid convolution of ``padded`` (B, width + T, C): (B, T, C)."""
        y = F.conv1d(padded.transpose(1, 2), self.weight.to(padded.dtype), groups=self.channels)
        if self.bias is not None:
            y = y + self.bias.to(padded.dtype)[:, None]
        return F.silu(y.transpose(1, 2))

    def _forward_packed(
        self, x: torch.Tensor, state: torch.Tensor | None, cu_seqlens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Every document gets its own ``width`` rows of history (its state, or zeros) inserted in front of it. One
        # convolution over that longer row then reaches back exactly to the document's own history and never into
        # the document before: no Python loop over documents, and the same kernel as the unpacked path.
        _, T, C = x.shape
        width = self.kernel_size - 1
        n_docs = cu_seqlens.numel() - 1
        offsets = cu_seqlens.to(device=x.device, dtype=torch.long)
        document, _ = document_positions(offsets, T)
        if state is None:
            state = x.new_zeros(n_docs, width, C)
        shift = torch.arange(n_docs, device=x.device) * width
        token_at = torch.arange(T, device=x.device) + (document + 1) * width
        history_at = (offsets[:-1] + shift)[:, None] + torch.arange(width, device=x.device)  # (N, width)
        rows = x.new_zeros(T + n_docs * width, C)
        rows = rows.index_copy(0, token_at, x[0]).index_copy(0, history_at.flatten(), state.to(x.dtype).flatten(0, 1))
        y = self._convolve(rows[None])[0]  # output j belongs to the token at row j + width
        y = y.index_select(0, token_at - width)[None]
        # A document's last ``width`` rows (its own tokens, topped up with its history when it is short).
        end_at = offsets[1:] + shift + width
        new_state = rows[end_at[:, None] - width + torch.arange(width, device=x.device)]
        return y, new_state


class MesaLayer(nn.Module):
    """Causal mesa-layer: a drop-in replacement for causal self-attention, (B, T, d_model) -> (B, T, d_model).

    Per head: ``q, k, v`` are linear projections of the input; the layer keeps ``H_t = gamma_t H_{t-1} +
    beta_t k_t k_t^T`` and ``G_t = gamma_t G_{t-1} + beta_t v_t k_t^T`` and outputs ``G_t (H_t + Lambda)^{-1} q_t``,
    the prediction at ``q_t`` of the ridge regression from keys to values fitted on tokens ``<= t``. The heads are
    concatenated and projected back to ``d_model``.

    With the defaults there are no gates (``beta = gamma = 1``) and no short convolution: the mesa-layer of von
    Oswald et al. (2023), with ``Lambda = diag(lambda)`` learned per head and key dimension (the paper's
    ``1/lambda``). Two stabilisers from MesaNet (2025) are on by default, L2-normalised queries and keys and an
    RMSNorm on each head's output; ``qk_norm=False, output_norm=False`` gives the 2023 layer exactly, e.g. to
    hand-set it to ridge regression. ``gated=True, short_conv=True, output_gate=True`` gives the MesaNet layer.

    Args:
        d_model: Width of the input and output.
        num_heads: Number of heads.
        head_dim: Width of each head's queries, keys and values; ``d_model // num_heads`` if ``None`` (then
            ``d_model`` must be divisible by ``num_heads``).
        gated: MesaNet's gates, computed per token and head from the input: input gate
            ``beta = sigmoid(linear(x))`` and forget gate ``log gamma = logsigmoid(linear(x))``. The forget-gate
            bias starts so that ``gamma`` spans 0.9 to 0.999 over the heads (memories of roughly 10 to 1000 tokens)
            rather than 0.5, which would forget nearly everything within a few tokens at initialisation. When
            ``False``, ``beta = gamma = 1`` (every token writes, nothing is forgotten).
        qk_norm: L2-normalise each head's queries and keys (no ``1/sqrt(d)`` scale); keeps ``H_t`` well scaled.
        short_conv: Pass queries and keys through a causal depthwise convolution over ``conv_size`` tokens followed
            by SiLU, as MesaNet does. Its last inputs are part of the recurrent state.
        lambda_init: Initial value of every entry of the regulariser ``Lambda`` (parameter ``lambda_theta``, which
            is best left out of weight decay; it carries ``_no_weight_decay = True``).
        lambda_min: Floor of the regulariser: ``Lambda = softplus(theta) + lambda_min``, so ``H_t + Lambda`` stays
            at least ``lambda_min * I`` and every solve is well posed. Must be ``>= 0`` and below ``lambda_init``;
            ``0`` lets ``Lambda`` shrink towards zero (e.g. ridge regression with a small penalty).
        output_norm: RMSNorm (with a learned scale) over each head's output before the output projection.
        chunk_size: Chunk length passed to the op's chunkwise method.
        bias: Whether the q, k, v, output (and output-gate) projections have biases. The gate projections always do.
        output_gate: Multiply each head's (normalised) output by ``silu(linear(x))`` before the output projection
            (MesaNet's gated RMSNorm when ``output_norm`` is also on).
        conv_size: Kernel size of the short convolution (used when ``short_conv``).
        norm_eps: Epsilon of the output RMSNorm.
        method: The op's method: ``"auto"`` (the op picks), ``"chunk"``, ``"recurrent"`` or ``"naive"``.

    Shapes:
        ``x``: (B, T, d_model) -> (B, T, d_model). ``attention_mask`` and ``write_mask``: (B, T). Packed documents:
        ``x`` (1, T, d_model) with ``cu_seqlens`` (N + 1,).

    Example:
        >>> layer = MesaLayer(256, num_heads=4)
        >>> y = layer(torch.randn(2, 10, 256))
        >>> y, state = layer(torch.randn(2, 10, 256), return_state=True)
        >>> y_next, state = layer(torch.randn(2, 1, 256), state=state, return_state=True)
        >>> y = layer(torch.randn(1, 10, 256), cu_seqlens=torch.tensor([0, 3, 10]))  # two documents, kept apart
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        gated: bool = False,
        qk_norm: bool = True,
        short_conv: bool = False,
        lambda_init: float = 1.0,
        lambda_min: float = 0.25,
        output_norm: bool = True,
        chunk_size: int = 64,
        bias: bool = False,
        output_gate: bool = False,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        method: str = "auto",
    ):
        super().__init__()
        if d_model < 1 or num_heads < 1:
            raise ValueError(f"d_model and num_heads must be positive, got {d_model} and {num_heads}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model ({d_model}) is not divisible by num_heads ({num_heads}); pass head_dim")
            head_dim = d_model // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if not lambda_min >= 0:
            raise ValueError(f"lambda_min must be >= 0, got {lambda_min}")
        if not lambda_init > lambda_min:
            raise ValueError(f"lambda_init ({lambda_init}) must be greater than lambda_min ({lambda_min})")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if short_conv and conv_size < 2:
            raise ValueError(f"conv_size must be at least 2, got {conv_size}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")

        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.gated = gated
        self.qk_norm = qk_norm
        self.short_conv = short_conv
        self.lambda_min = float(lambda_min)
        self.chunk_size = chunk_size
        self.method = method
        inner = num_heads * head_dim

        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.o_proj = nn.Linear(inner, d_model, bias=bias)
        # One depthwise convolution over the concatenated queries and keys is the same as one for each.
        self.conv = ShortConvolution(2 * inner, conv_size) if short_conv else None
        if gated:
            self.beta_proj = nn.Linear(d_model, num_heads)
            self.gamma_proj = nn.Linear(d_model, num_heads)
            with torch.no_grad():
                self.beta_proj.bias.zero_()
                gamma0 = 1.0 - torch.logspace(-1, -3, num_heads)  # 0.9 ... 0.999
                self.gamma_proj.bias.copy_(torch.log(gamma0) - torch.log1p(-gamma0))
        else:
            self.beta_proj = self.gamma_proj = None
        # Lambda = softplus(theta) + lambda_min, so theta starts at softplus^{-1}(lambda_init - lambda_min).
        theta0 = float(lambda_init - lambda_min)
        theta0 = theta0 + math.log(-math.expm1(-theta0))
        self.lambda_theta = nn.Parameter(torch.full((num_heads, head_dim), theta0))
        # Weight decay would pull Lambda towards softplus(0) + lambda_min; optimisers that honour this flag skip it.
        self.lambda_theta._no_weight_decay = True
        self.o_norm = nn.RMSNorm(head_dim, eps=norm_eps) if output_norm else None
        self.g_proj = nn.Linear(d_model, inner, bias=bias) if output_gate else None

    @property
    def lam(self) -> torch.Tensor:
        """The regulariser ``Lambda`` as an (H, Dk) tensor of positive entries."""
        return F.softplus(self.lambda_theta) + self.lambda_min

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, gated={self.gated}, "
            f"qk_norm={self.qk_norm}, short_conv={self.short_conv}, lambda_min={self.lambda_min}, "
            f"chunk_size={self.chunk_size}, method={self.method!r}"
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        write_mask: torch.Tensor | None = None,
        state: MesaState | None = None,
        return_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, MesaState]:
        """Applies the layer causally.

        Args:
            x: Input of shape (B, T, d_model).
            attention_mask: (B, T), nonzero for real tokens and 0 for padding, on either side or anywhere. Padding
                tokens neither write into nor decay the statistics, are skipped by the short convolution, and their
                outputs are 0; every real token gets exactly what it would get without the padding.
            write_mask: (B, T), nonzero for tokens that write into the statistics and 0 for tokens that only read:
                a read-only token leaves the state as it found it (``beta = 0`` and no decay) and reads
                ``G_{t-1} (H_{t-1} + Lambda)^{-1} q_t``, e.g. a query that must not enter its own regression.
            state: State returned by a previous call, to continue that sequence; a fresh sequence if ``None``.
                With ``cu_seqlens``, one state per document (leading dimension N), or ``None``.
            return_state: Also return the state after the last (real) token; with ``cu_seqlens``, the state after
                each document (leading dimension N), ready to continue the N documents as a batch.
            cu_seqlens: Offsets ``[0, l_1, l_1 + l_2, ..., T]`` of N documents packed into one row (B = 1; see
                :mod:`mesa_module.packing`): each document starts from a fresh state (or its entry of ``state``), and
                neither the statistics nor the short convolution carry anything across a document boundary. Each
                document gets exactly what it would get alone. Not combined with ``attention_mask`` (packing needs
                no padding).

        Returns:
            ``y`` of shape (B, T, d_model), or ``(y, new_state)`` if ``return_state``.

        Raises:
            ValueError: If shapes, dtypes, packing offsets or the state do not fit the layer.
            TypeError: If ``cu_seqlens`` is not an integer tensor.
        """
        self._check_inputs(x, attention_mask, write_mask, state, cu_seqlens)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim

        keep = order = lengths = None
        if attention_mask is not None:
            keep = attention_mask != 0
            # Move each sequence's real tokens to the front, keeping their order: the short convolution then
            # sees them contiguously, and the pads at the end cannot reach them, whatever the padding pattern.
            order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
            x = x.gather(1, order[..., None].expand_as(x))
            keep = keep.gather(1, order)
            lengths = keep.sum(1)
            if write_mask is not None:
                write_mask = write_mask.gather(1, order)

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.conv is not None:
            conv_in = torch.cat([q, k], dim=-1)
            qk, conv_state = self.conv(conv_in, None if state is None else state.conv, lengths, cu_seqlens)
            q, k = qk.chunk(2, dim=-1)
        q, k, v = (t.reshape(B, T, H, D) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)

        # Gates are computed in at least float32: they multiply the float32 statistics.
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        writes = keep
        if write_mask is not None:
            writes = write_mask != 0 if writes is None else writes & (write_mask != 0)
        beta = log_gamma = None
        if self.gated:
            beta = torch.sigmoid(self.beta_proj(x).to(gate_dtype))
            log_gamma = F.logsigmoid(self.gamma_proj(x).to(gate_dtype))
        if writes is not None:
            w = writes[..., None]
            beta = w.to(gate_dtype).expand(B, T, H) if beta is None else beta * w
            if log_gamma is not None:
                log_gamma = log_gamma * w

        o = mesa_attention(
            q,
            k,
            v,
            self.lam,
            beta=beta,
            log_gamma=log_gamma,
            initial_state=None if state is None else (state.h, state.g),
            output_final_state=return_state,
            method=self.method,
            chunk_size=self.chunk_size,
            cu_seqlens=cu_seqlens,
        )
        if return_state:
            o, (h, g) = o
        if self.o_norm is not None:
            # In the norm's own precision: under autocast ``o`` is half precision and the norm is not autocast.
            o = self.o_norm(o.to(self.o_norm.weight.dtype)).to(o.dtype)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x)).reshape(B, T, H, D)
        y = self.o_proj(o.reshape(B, T, H * D))

        if order is not None:
            y = y * keep[..., None]
            y = y.gather(1, torch.argsort(order, dim=1)[..., None].expand_as(y))
        if return_state:
            return y, MesaState(h, g, conv_state)
        return y

    def _check_inputs(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        write_mask: torch.Tensor | None,
        state: MesaState | None,
        cu_seqlens: torch.Tensor | None,
    ) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        B, T, _ = x.shape
        for name, mask in (("attention_mask", attention_mask), ("write_mask", write_mask)):
            if mask is not None and tuple(mask.shape) != (B, T):
                raise ValueError(f"{name} must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
        # One state per sequence, or per document when packed.
        n, rows = B, "batch"
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError(
                    "pass either attention_mask (a padded batch) or cu_seqlens (documents packed into one row), not both"
                )
            n, rows = check_cu_seqlens(cu_seqlens, B, T), "number of packed documents"
        if state is None:
            return
        if not isinstance(state, MesaState):
            raise ValueError(f"state must be a MesaState returned by this layer, got {type(state).__name__}")
        H, D = self.num_heads, self.head_dim
        if tuple(state.h.shape) != (n, H, D, D) or tuple(state.g.shape) != (n, H, D, D):
            raise ValueError(
                f"state does not fit this layer and {rows} ({n}): expected h and g of shape {(n, H, D, D)}, "
                f"got {tuple(state.h.shape)} and {tuple(state.g.shape)}"
            )
        if self.conv is not None:
            width = self.conv.kernel_size - 1
            if state.conv is None or tuple(state.conv.shape) != (n, width, 2 * H * D):
                got = None if state.conv is None else tuple(state.conv.shape)
                raise ValueError(
                    f"state.conv must have shape {(n, width, 2 * H * D)} for the short convolution, got {got}"
                )
        elif state.conv is not None:
            raise ValueError("state.conv is set but this layer has no short convolution")
