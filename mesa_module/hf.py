"""Hugging Face ``transformers`` classes for :class:`mesa_module.MesaLM` (the optional ``hf`` extra).

``MesaConfig`` and ``MesaForCausalLM`` make a ``MesaLM`` a ``transformers`` causal language model: ``generate()``
(greedy, sampling, beam search), ``save_pretrained`` / ``from_pretrained`` (safetensors), the ``Trainer``, activation
checkpointing through ``activation_checkpointing_enable()`` / ``TrainingArguments(gradient_checkpointing=True)``, and
packed training through ``DataCollatorWithFlattening``. Importing this module registers the classes with
``AutoConfig`` and ``AutoModelForCausalLM`` under the model type ``"mesa_lm"``.

The model inside is the plain ``MesaLM`` (``model.model``), so the same weights run with or without
``transformers``; :meth:`MesaForCausalLM.from_mesa_lm` wraps one trained without it.

    >>> from mesa_module.hf import MesaConfig, MesaForCausalLM
    >>> model = MesaForCausalLM(MesaConfig(vocab_size=256, d_model=128, n_layers=4, attention=["mesa", "softmax"] * 2))
    >>> out = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    >>> model.save_pretrained("runs/mesa-hf")  # config.json + model.safetensors
"""

from __future__ import annotations

import dataclasses
import logging

import torch

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils.deprecation import deprecate_kwarg
except ImportError as error:  # the rest of mesa_module works without transformers
    raise ImportError(
        "mesa_module.hf needs transformers 5.24 or newer: install the hf extra, pip install -e '.[hf]'"
    ) from error

from .layer import MesaLayer, MesaState
from .model import KVCache, MesaLM, MesaLMConfig
from .packing import cu_seqlens_from_position_ids

logger = logging.getLogger(__name__)

__all__ = ["MesaCache", "MesaConfig", "MesaForCausalLM"]

# MesaLMConfig fields kept out of the Hugging Face config: transformers names the first ``tie_word_embeddings``, and
# turns activation checkpointing on and off itself (``activation_checkpointing_enable``).
_RENAMED = {"tie_embeddings": "tie_word_embeddings"}
_NOT_IN_CONFIG = ("gradient_checkpointing",)


class MesaConfig(PreTrainedConfig):
    """Configuration of :class:`MesaForCausalLM`: the fields of :class:`mesa_module.MesaLMConfig`, same meanings.

    ``tie_embeddings`` is called ``tie_word_embeddings`` here, as everywhere in ``transformers``; ``hidden_size``,
    ``num_hidden_layers`` and ``num_attention_heads`` are aliases of ``d_model``, ``n_layers`` and ``n_heads``. Values
    are checked by ``MesaLMConfig``.

    Attributes:
        use_cache: Whether ``forward`` returns a :class:`MesaCache` by default outside training (``generate`` always
            uses one).
        bos_token_id: Begin-of-sequence token id, if the tokenizer has one.
        eos_token_id: End-of-sequence token id (or ids); ``generate`` stops there.
        pad_token_id: Padding token id.
    """

    model_type = "mesa_lm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None
    attention: str | list[str] = "mesa"
    mlp_ratio: float = 4.0
    bias: bool = False
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_base: float = 10000.0
    mesa_gated: bool = True
    mesa_short_conv: bool = True
    mesa_output_gate: bool = True
    mesa_lambda_init: float = 1.0
    mesa_lambda_min: float = 0.25
    mesa_chunk_size: int = 64
    mesa_method: str = "auto"
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        checked = self.to_mesa_lm_config()  # raises on values MesaLM cannot build
        self.attention = list(checked.attention)
        self.head_dim = checked.head_dim
        super().__post_init__(**kwargs)

    def to_mesa_lm_config(self) -> MesaLMConfig:
        """The equivalent :class:`mesa_module.MesaLMConfig` (activation checkpointing off)."""
        values = {}
        for field in dataclasses.fields(MesaLMConfig):
            if field.name not in _NOT_IN_CONFIG:
                values[field.name] = getattr(self, _RENAMED.get(field.name, field.name))
        values["attention"] = (
            values["attention"] if isinstance(values["attention"], str) else tuple(values["attention"])
        )
        return MesaLMConfig(**values)

    @classmethod
    def from_mesa_lm_config(cls, config: MesaLMConfig, **kwargs) -> MesaConfig:
        """The Hugging Face config of a :class:`mesa_module.MesaLMConfig`; ``kwargs`` set further fields (e.g. token ids)."""
        values = {
            _RENAMED.get(field.name, field.name): getattr(config, field.name)
            for field in dataclasses.fields(MesaLMConfig)
            if field.name not in _NOT_IN_CONFIG
        }
        values["attention"] = list(values["attention"])
        return cls(**values, **kwargs)


class MesaCacheLayer:
    """One layer's entry in a :class:`MesaCache`: its ``MesaState`` or ``KVCache``, ``None`` before the first call."""

    supports_early_init = False
    is_compileable = False  # the state is replaced, not written in place, at every step
    is_croppable = False
    is_sliding = False

    def __init__(self, kind: str):
        self.kind = kind
        self.state: MesaState | KVCache | None = None

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = type(self.state)(*(None if t is None else fn(t) for t in self.state))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.state = None

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:  # the states are small next to a KV cache; offloading is not implemented
        pass

    def prefetch(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"MesaCacheLayer({self.kind}, {'empty' if self.state is None else type(self.state).__name__})"


class MesaCache(Cache):
    """The decoding state of a :class:`MesaForCausalLM`: per layer, the mesa layer's recurrent state (statistics and
    short-convolution inputs, constant size) or the softmax layer's keys, values and padding mask.

    ``generate()`` creates one; ``forward(..., use_cache=True)`` returns one to pass back with the next tokens. It
    cannot be cropped (a recurrent state cannot be rolled back), so assisted decoding is not available.

    Args:
        config: The model's config (its ``attention`` kinds give the layers).
    """

    def __init__(self, config: MesaConfig):
        super().__init__(layers=[MesaCacheLayer(kind) for kind in config.attention])
        self.seen_tokens = 0

    @property
    def states(self) -> list[MesaState | KVCache] | None:
        """The per-layer states in the form ``MesaLM`` takes, or ``None`` before the first call."""
        if self.seen_tokens == 0:
            return None
        return [layer.state for layer in self.layers]

    def store(self, states: list[MesaState | KVCache], n_tokens: int) -> None:
        """Keeps the states a ``MesaLM`` call returned after ``n_tokens`` more positions (padding included)."""
        for layer, state in zip(self.layers, states, strict=True):
            layer.state = state
        self.seen_tokens += n_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen so far (padding included), the length of the attention mask that goes with them."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a MesaCache cannot be cropped: mesa layers keep a recurrent state, not the past tokens")

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.state is not None:
                return layer.state[0].shape[0]
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [layer.kind == "mesa" for layer in self.layers]


class MesaForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`mesa_module.MesaLM` as a ``transformers`` causal language model.

    Args:
        config: The model's configuration.

    Attributes:
        model: The ``MesaLM`` that does the work.
    """

    config_class = MesaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = True  # forward takes num_items_in_batch, for exact losses under gradient accumulation
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.wte.weight"}

    def __init__(self, config: MesaConfig):
        super().__init__(config)
        self.model = MesaLM(config.to_mesa_lm_config())
        self.post_init()

    def _init_weights(self, module):
        # MesaLM initialises its weights when it is built (GPT-2's scheme, gates and regulariser at chosen values);
        # transformers' generic initialisation would overwrite the gate biases.
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates a MesaCache; a DynamicCache cannot hold mesa states

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, keeping the regulariser's ``_no_weight_decay`` flag."""
        model = super().from_pretrained(*args, **kwargs)
        # Loading puts new Parameter objects in place, without the flag that optimisers read to skip weight decay.
        for module in model.modules():
            if isinstance(module, MesaLayer):
                module.lambda_theta._no_weight_decay = True
        return model

    @classmethod
    def from_mesa_lm(cls, model: MesaLM, **config_kwargs) -> MesaForCausalLM:
        """A copy of a ``MesaLM`` (e.g. trained without ``transformers``) as a ``MesaForCausalLM``.

        Args:
            model: The model to copy (weights, dtype and device).
            **config_kwargs: Further config fields, e.g. ``eos_token_id``.
        """
        parameter = next(model.parameters())
        hf_model = cls(MesaConfig.from_mesa_lm_config(model.config, **config_kwargs))
        hf_model.to(device=parameter.device, dtype=parameter.dtype)
        hf_model.model.load_state_dict(model.state_dict())
        return hf_model

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.wte

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MesaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits, and the loss when ``labels`` are given (shifted inside, as in every ``transformers``
        causal LM: ``labels`` may simply be ``input_ids``, with ``-100`` where no loss is wanted).

        Args:
            input_ids: Token ids (B, T).
            attention_mask: (B, T), or (B, past + T) with a cache, 0 for padding (either side).
            position_ids: Read only to find packed documents: one row (B = 1) whose positions restart at 0 at each
                document start, as ``DataCollatorWithFlattening`` makes them, is taken as packed documents that do
                not see each other (mesa states restart, softmax attention stays within each document, rotary
                positions restart). Otherwise the model counts positions itself (over real tokens).
            cache: A :class:`MesaCache` from a previous call, to continue those sequences.
            inputs_embeds: Not supported (pass ``input_ids``).
            labels: (B, T) token ids for the loss.
            use_cache: Return a :class:`MesaCache`; defaults to ``config.use_cache`` outside training, off in training
                and for packed documents.
            output_attentions: Not supported.
            output_hidden_states: Not supported.
            return_dict: ``False`` returns a tuple.
            num_items_in_batch: Number of label tokens in the whole (gradient-accumulated) batch, from the ``Trainer``.
            cu_seq_lens_q: Document offsets ``[0, l_1, ..., T]`` of packed input (``DataCollatorWithFlattening(
                return_flash_attn_kwargs=True)``); taken instead of ``position_ids``.
            cu_seq_lens_k: Must equal ``cu_seq_lens_q`` (self-attention).
            max_length_q: Ignored (the longest document, for flash-attention kernels).
            max_length_k: Ignored.

        Returns:
            ``CausalLMOutputWithPast`` with ``loss``, ``logits`` (B, T, vocab_size) and ``cache``.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("MesaForCausalLM takes input_ids (token ids); inputs_embeds is not supported")
        if output_attentions or output_hidden_states:
            raise ValueError("MesaForCausalLM does not return attentions or hidden states")
        if cache is not None and not isinstance(cache, MesaCache):
            raise TypeError(
                f"cache must be a MesaCache (mesa layers keep recurrent states), got {type(cache).__name__}; "
                "leave it out and generate() or forward(use_cache=True) creates one"
            )
        past = 0 if cache is None else cache.get_seq_length()
        T = input_ids.shape[1]
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] not in (T, past + T):
                raise ValueError(
                    f"attention_mask must have shape (B, T) = (B, {T}) or, with a cache, (B, past + T) = "
                    f"(B, {past + T}); got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask[:, -T:]
            if bool((attention_mask != 0).all()):
                attention_mask = None  # no padding: the faster unmasked path gives the same result
        cu_seqlens = self._packed_offsets(input_ids, attention_mask, position_ids, past, cu_seq_lens_q, cu_seq_lens_k)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and cu_seqlens is None
        if cu_seqlens is not None and (use_cache or cache is not None):
            raise ValueError(
                "packed documents (position_ids restarting at 0, or cu_seq_lens_q) are for training: "
                "pass use_cache=False and no cache"
            )
        if use_cache and cache is None:
            cache = MesaCache(self.config)

        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            state=None if cache is None else cache.states,
            return_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        logits = out[0]
        if cache is not None:
            cache.store(out[2], T)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return output.to_tuple() if return_dict is False else output

    @staticmethod
    def _packed_offsets(input_ids, attention_mask, position_ids, past, cu_seq_lens_q, cu_seq_lens_k):
        """Document offsets if the input is packed documents, else ``None``."""
        if cu_seq_lens_q is not None:
            if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
                raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: queries and keys are the same tokens")
            return cu_seq_lens_q.to(input_ids.device)
        if position_ids is None or input_ids.shape[0] != 1 or attention_mask is not None or past:
            return None
        position_ids = position_ids.to(input_ids.device).reshape(1, -1)
        if position_ids.shape[1] < 2 or not bool((position_ids[0, 1:] == 0).any()):
            return None  # one document: the usual causal path
        return cu_seqlens_from_position_ids(position_ids)


AutoConfig.register(MesaConfig.model_type, MesaConfig, exist_ok=True)
AutoModelForCausalLM.register(MesaConfig, MesaForCausalLM, exist_ok=True)
