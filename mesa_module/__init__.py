"""The mesa-layer as a PyTorch module: functional op, layer and a reference language model."""

from .layer import MesaLayer, MesaState
from .model import MesaLM, MesaLMConfig
from .ops import mesa_attention

__all__ = ["mesa_attention", "MesaLayer", "MesaState", "MesaLM", "MesaLMConfig"]
