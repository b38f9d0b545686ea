"""The mesa-layer as a PyTorch module: functional op, layer and a reference language model.

``mesa_module.hf`` (the optional ``hf`` extra) adds Hugging Face ``transformers`` classes for the model.
"""

from .layer import MesaLayer, MesaState
from .model import MesaLM, MesaLMConfig
from .ops import mesa_attention
from .packing import cu_seqlens_from_position_ids

__all__ = ["mesa_attention", "MesaLayer", "MesaState", "MesaLM", "MesaLMConfig", "cu_seqlens_from_position_ids"]
