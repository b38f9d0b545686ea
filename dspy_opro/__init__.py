"""OPRO (Optimization by PROmpting) as a DSPy optimizer.

from dspy_opro import OPRO
optimized = OPRO(metric=metric, prompt_model="openai/gpt-4o-mini").compile(program, trainset=train, valset=val)

`setup_models` sets up task and prompt models by the package's one policy (the demo, the examples and
the benchmarks use it); `dspy_opro.study` compares the optimized instruction with baselines on held-out
data; `dspy_opro.numeric` runs OPRO on black-box numeric problems; `dspy_opro.local` serves local models.
"""

import os

# litellm fetches its model-cost map from the network at import unless told otherwise;
# offline that stalls every first call. An explicit user setting wins.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from .candidates import dedup_key, normalize_instruction  # noqa: E402
from .exemplars import EXEMPLAR_STRATEGIES  # noqa: E402
from .families import Family, meta_prompt_family  # noqa: E402
from .local import register as _register_local_provider  # noqa: E402
from .meta_prompt import FAMILIES, Exemplar, extract_instruction, render_meta_prompt  # noqa: E402
from .models import ModelSetup, setup_models  # noqa: E402
from .optimizer import OPRO  # noqa: E402

__version__ = "0.1.0"

# The embedded local models answer to "local/..." model strings in litellm and dspy.LM.
_register_local_provider()


def register() -> None:
    """Make ``dspy.OPRO`` and ``dspy.teleprompt.OPRO`` resolve to `OPRO`.

    DSPy has no plugin registry for optimizers; code that looks optimizers up by name on
    the ``dspy`` or ``dspy.teleprompt`` modules sees OPRO only after this explicit opt-in.
    Calling it again does nothing more.
    """
    import dspy
    import dspy.teleprompt

    dspy.OPRO = OPRO
    dspy.teleprompt.OPRO = OPRO
    exported = getattr(dspy.teleprompt, "__all__", None)
    if isinstance(exported, list) and "OPRO" not in exported:
        exported.append("OPRO")


__all__ = [
    "OPRO",
    "ModelSetup",
    "setup_models",
    "Family",
    "meta_prompt_family",
    "register",
    "render_meta_prompt",
    "extract_instruction",
    "normalize_instruction",
    "dedup_key",
    "Exemplar",
    "FAMILIES",
    "EXEMPLAR_STRATEGIES",
]
