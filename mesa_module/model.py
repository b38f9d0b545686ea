"""A small causal language model whose attention layers are mesa-layers, softmax attention, or a mix of both.

The file reads top to bottom: the config, softmax attention (with rotary positions and a KV cache), the MLP, the
transformer block, the model and its ``generate``. To try another mixer, change ``Block.__init__``.

Mesa layers need no position encoding (they are causal recurrences); softmax layers use rotary embeddings with
positions counted over real tokens only, so padding on either side changes nothing for real tokens. Documents packed
into one row (``cu_seqlens``, see :mod:`mesa_module.packing`) are kept apart by every layer: mesa states restart,
softmax attention stays within each document and rotary positions restart at 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layer import MesaLayer, MesaState
from .packing import check_cu_seqlens, document_positions

__all__ = ["MesaLM", "MesaLMConfig", "CausalSelfAttention", "KVCache"]

ATTENTION_KINDS = ("mesa", "softmax")


@dataclass
class MesaLMConfig:
    """Configuration of :class:`MesaLM`.

    Attributes:
        vocab_size: Number of token ids.
        d_model: Width of the residual stream.
        n_layers: Number of blocks.
        n_heads: Heads per attention layer (mesa or softmax).
        head_dim: Width of each head; ``d_model // n_heads`` if ``None``.
        attention: Attention kind per block, ``"mesa"`` or ``"softmax"``: one string for every block, or a sequence
            of ``n_layers`` strings for a hybrid, e.g. ``("mesa", "mesa", "softmax", "mesa")``.
        mlp_ratio: Hidden width of the MLP as a multiple of ``d_model``.
        bias: Biases in the linear layers (the mesa gates always have one).
        norm_eps: Epsilon of the RMSNorms.
        tie_embeddings: Share the token embedding with the output head.
        rope_base: Base of the rotary position embedding of the softmax layers.
        mesa_gated: Input and forget gates in the mesa layers (see :class:`MesaLayer`).
        mesa_short_conv: Short causal convolution on the mesa queries and keys.
        mesa_output_gate: Gated output norm in the mesa layers.
        mesa_lambda_init: Initial regulariser of the mesa layers.
        mesa_lambda_min: Floor of the mesa regulariser.
        mesa_chunk_size: Chunk length of the mesa op.
        mesa_method: Method of the mesa op (``"auto"``, ``"chunk"``, ``"recurrent"``, ``"naive"``).
        gradient_checkpointing: Recompute each block's activations in the backward pass instead of storing them
            (activation checkpointing): training memory grows with one block's activations instead of all of them,
            for about one more forward pass of compute. Only while training with gradients; same gradients.

    The mesa defaults here are MesaNet's (gates, short convolution, gated output norm), which suit language
    modelling; :class:`MesaLayer`'s own defaults are the ungated 2023 layer.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None
    attention: str | tuple[str, ...] = "mesa"
    mlp_ratio: float = 4.0
    bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    mesa_gated: bool = True
    mesa_short_conv: bool = True
    mesa_output_gate: bool = True
    mesa_lambda_init: float = 1.0
    mesa_lambda_min: float = 0.25
    mesa_chunk_size: int = 64
    mesa_method: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if min(self.vocab_size, self.d_model, self.n_layers, self.n_heads) < 1:
            raise ValueError("vocab_size, d_model, n_layers and n_heads must be positive")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set head_dim")
            self.head_dim = self.d_model // self.n_heads
        kinds = (self.attention,) * self.n_layers if isinstance(self.attention, str) else tuple(self.attention)
        if len(kinds) != self.n_layers or any(kind not in ATTENTION_KINDS for kind in kinds):
            raise ValueError(
                f"attention must be one of {ATTENTION_KINDS} or a sequence of n_layers={self.n_layers} of them, "
                f"got {self.attention!r}"
            )
        if "softmax" in kinds and self.head_dim % 2:
            raise ValueError(f"softmax layers use rotary embeddings and need an even head_dim, got {self.head_dim}")
        self.attention = kinds


class KVCache(NamedTuple):
    """Keys (already rotated) and values of a softmax layer, and which of them are real tokens.

    Attributes:
        k: (B, n_heads, S, head_dim).
        v: (B, n_heads, S, head_dim).
        mask: (B, S) bool, ``False`` for padding.
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotates feature pairs of ``x`` (B, H, T, D) by angles ``position * base^(-2i/D)``; ``positions`` is (B, T)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal softmax attention with rotary positions and a KV cache; same call signature as :class:`MesaLayer`."""

    def __init__(self, config: MesaLMConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_base = config.n_heads, config.head_dim, config.rope_base
        inner = config.n_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.d_model, 3 * inner, bias=config.bias)
        self.o_proj = nn.Linear(inner, config.d_model, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        state: KVCache | None = None,
        return_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qkv_proj(x).chunk(3, -1))
        if cu_seqlens is not None:
            return self._forward_packed(q, k, v, cu_seqlens, state, return_state)

        real = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask != 0
        past_len = 0 if state is None else state.k.shape[2]
        past_real = 0 if state is None else state.mask.sum(1, keepdim=True)
        # Padding tokens take the position of the real token before them; nothing attends to them.
        positions = past_real + real.cumsum(1) - 1
        q, k = apply_rotary(q, positions, self.rope_base), apply_rotary(k, positions, self.rope_base)
        key_mask = real
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
            key_mask = torch.cat([state.mask, real], dim=1)

        if state is None and attention_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            query_at = past_len + torch.arange(T, device=x.device)[:, None]
            key_at = torch.arange(k.shape[2], device=x.device)[None, :]
            allowed = (key_at <= query_at) & key_mask[:, None, :]
            # A padding query may see no real key at all; letting every query see itself keeps its (discarded)
            # output finite instead of NaN.
            allowed = allowed | (key_at == query_at)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if attention_mask is not None:
            y = y * real[..., None]
        if return_state:
            return y, KVCache(k, v, key_mask)
        return y

    def _forward_packed(self, q, k, v, cu_seqlens, state, return_state):
        """Attention within each packed document (B = 1), rotary positions counted from each document's start."""
        if state is not None:
            raise ValueError(
                "a softmax layer cannot continue packed documents from a KV cache; continue them as a batch from the "
                "state that a packed call with return_state=True returns (one row per document)"
            )
        T = q.shape[2]
        document, position = document_positions(cu_seqlens, T)
        q, k = apply_rotary(q, position[None], self.rope_base), apply_rotary(k, position[None], self.rope_base)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=q.device, dtype=torch.long)
        longest = int(lengths.max())

        def as_batch(t):  # (1, H, T, D) -> one right-padded row per document, (N, H, longest, D)
            rows = t.new_zeros(lengths.numel(), self.n_heads, longest, t.shape[-1])
            rows[document, :, position] = t[0].transpose(0, 1)
            return rows

        k_rows = v_rows = None
        if lengths.numel() * longest <= 2 * T:
            # The documents as a right-padded batch: causal attention never reaches the padding that follows a real
            # token, so the fast unmasked kernel applies, at N * longest^2 work instead of T^2.
            k_rows, v_rows = as_batch(k), as_batch(v)
            y = F.scaled_dot_product_attention(as_batch(q), k_rows, v_rows, is_causal=True)
            y = y[document, :, position].transpose(0, 1)[None]
        else:
            # Lengths too uneven for that (padding would dominate): one block-diagonal causal (T, T) mask.
            t = torch.arange(T, device=q.device)
            allowed = (t[None, :] <= t[:, None]) & (document[None, :] == document[:, None])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = self.o_proj(y.transpose(1, 2).reshape(1, T, -1))
        if not return_state:
            return y
        # The right-padded rows are also the KV cache with which the documents go on decoding as a batch.
        if k_rows is None:
            k_rows, v_rows = as_batch(k), as_batch(v)
        mask = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]
        return y, KVCache(k_rows, v_rows, mask)


class MLP(nn.Module):
    def __init__(self, config: MesaLMConfig):
        super().__init__()
        hidden = int(config.mlp_ratio * config.d_model)
        self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: MesaLMConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if kind == "mesa":
            self.attn = MesaLayer(
                config.d_model,
                config.n_heads,
                config.head_dim,
                gated=config.mesa_gated,
                short_conv=config.mesa_short_conv,
                output_gate=config.mesa_output_gate,
                lambda_init=config.mesa_lambda_init,
                lambda_min=config.mesa_lambda_min,
                chunk_size=config.mesa_chunk_size,
                method=config.mesa_method,
                bias=config.bias,
                norm_eps=config.norm_eps,
            )
        else:
            self.attn = CausalSelfAttention(config)
        self.norm2 = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, *, attention_mask=None, state=None, return_state=False, cu_seqlens=None):
        out = self.attn(
            self.norm1(x), attention_mask=attention_mask, state=state, return_state=return_state, cu_seqlens=cu_seqlens
        )
        a, new_state = out if return_state else (out, None)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, new_state


class MesaLM(nn.Module):
    """Causal language model: token embedding, ``n_layers`` blocks, final RMSNorm, output head.

    Args:
        config: The model's configuration; ``config.attention`` sets each block's attention kind.

    Attributes:
        gradient_checkpointing: Whether training recomputes each block's activations in the backward pass (starts
            at ``config.gradient_checkpointing``; Hugging Face's ``activation_checkpointing_enable`` sets it too).

    Example:
        >>> model = MesaLM(MesaLMConfig(vocab_size=100, d_model=64, n_layers=2, attention=("mesa", "softmax")))
        >>> logits, loss = model(idx, targets)
        >>> out = model.generate(prompt, max_new_tokens=20, temperature=0)
        >>> logits, loss = model(packed_idx, packed_targets, cu_seqlens=torch.tensor([0, 5, 12]))  # 2 documents
    """

    # Hugging Face replaces this (e.g. to pass other checkpoint options); non-reentrant checkpointing takes keywords.
    _gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def __init__(self, config: MesaLMConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, kind) for kind in config.attention)
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self):
        # GPT-2's scheme. Biases keep their module's initialisation: the mesa gates start at chosen values.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        # Residual projections scaled down with depth so the residual stream's variance stays put.
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.n_layers))

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        state: list[MesaState | KVCache] | None = None,
        return_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ):
        """Computes next-token logits for every position.

        Args:
            idx: Token ids (B, T).
            targets: Optional next-token ids (B, T) for a mean cross-entropy loss; ``-100`` entries (e.g. padding,
                or the last token of each packed document, whose next token belongs to another document) are
                ignored.
            attention_mask: Optional (B, T), 0 for padding (either side); real tokens get the logits they would get
                without the padding.
            state: Per-layer states from a previous call (a :class:`MesaState` for mesa layers, a
                :class:`KVCache` for softmax layers), to continue those sequences.
            return_state: Also return the per-layer states after this call. With ``cu_seqlens``: one row per
                document (mesa states per document, softmax caches right-padded), so the documents continue as a
                batch of N sequences.
            cu_seqlens: Offsets ``[0, l_1, l_1 + l_2, ..., T]`` of N documents packed into one row (B = 1, see
                :mod:`mesa_module.packing`): every document gets exactly the logits it would get alone. Not
                combined with ``attention_mask``, nor with ``state`` when the stack has softmax layers.

        Returns:
            ``(logits, loss)``, or ``(logits, loss, state)`` if ``return_state``; ``loss`` is ``None`` without
            ``targets``. ``logits`` has shape (B, T, vocab_size).
        """
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be integer token ids of shape (B, T), got {idx.dtype} {tuple(idx.shape)}")
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state must hold one entry per layer ({len(self.blocks)}), got {len(state)}")
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError(
                    "pass either attention_mask (a padded batch) or cu_seqlens (documents packed into one row), not both"
                )
            check_cu_seqlens(cu_seqlens, *idx.shape)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.wte(idx)
        new_state = []
        for block, layer_state in zip(self.blocks, state or [None] * len(self.blocks), strict=True):
            kwargs = dict(
                attention_mask=attention_mask, state=layer_state, return_state=return_state, cu_seqlens=cu_seqlens
            )
            if checkpointing:
                x, layer_state = self._gradient_checkpointing_func(block.__call__, x, **kwargs)
            else:
                x, layer_state = block(x, **kwargs)
            new_state.append(layer_state)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        if return_state:
            return logits, loss, new_state
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continues each prompt by ``max_new_tokens`` tokens.

        The prompt is processed once (prefill); each new token then costs one step that reuses the layers' states:
        the constant-size recurrent state for mesa layers and the KV cache for softmax layers.

        Args:
            idx: Prompt token ids (B, T).
            max_new_tokens: Number of tokens to append.
            temperature: Softmax temperature; ``0`` picks the most likely token (greedy).
            top_k: Sample only among the ``top_k`` most likely tokens.
            attention_mask: Optional (B, T), 0 for prompt padding (either side), for prompts of different lengths.
            generator: Random generator for sampling.

        Returns:
            (B, T + max_new_tokens) token ids: the prompts (with their padding) followed by the new tokens.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        logits, _, state = self(idx, attention_mask=attention_mask, return_state=True)
        if attention_mask is None:
            last = logits[:, -1]
        else:  # the last real token of each prompt, wherever the padding is
            positions = torch.arange(1, idx.shape[1] + 1, device=idx.device)
            last = logits[torch.arange(idx.shape[0]), ((attention_mask != 0) * positions).argmax(1)]
        out = [idx]
        for step in range(max_new_tokens):
            if temperature == 0:
                next_id = last.argmax(-1, keepdim=True)
            else:
                scaled = last.float() / temperature
                if top_k is not None:
                    kth = torch.topk(scaled, min(top_k, scaled.shape[-1])).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)
            out.append(next_id)
            if step + 1 < max_new_tokens:
                logits, _, state = self(next_id, state=state, return_state=True)
                last = logits[:, -1]
        return torch.cat(out, dim=1)
