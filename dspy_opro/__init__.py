"""OPRO (Optimization by PROmpting) as a DSPy optimizer."""

import os

# litellm fetches its model-cost map from the network at import unless told otherwise;
# offline that stalls every first call. Respect an explicit user setting.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
