"""Models for OPRO runs: model strings to LMs, and the one model-setup policy.

`resolve_lm` turns a model string into a ``dspy.LM`` with a finite timeout. `optimizer_model` builds the
prompt model a meta-prompt family needs (a text-completion LM for ``"base"``). `setup_models` is the
model-setup policy the demo, the examples and the benchmarks share: a local task model gets the
small-model adapter and short greedy answers, every task model answers greedily, the prompt model comes
in its family's form, and a chat form of it serves optimizers that prompt through DSPy's adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dspy

from .families import MODEL_TYPES, check_family, meta_prompt_family
from .local.names import is_local_model, serves_generator

logger = logging.getLogger(__name__)


def _served_by_dspy(model: str) -> bool:
    """Whether DSPy's own client routes ``model`` (offline; no litellm import, no call)."""
    try:
        from dspy.clients.backend_selection import select_backend

        return select_backend(dspy.LM(model)).native
    except Exception:  # an internal DSPy change, or a string DSPy refuses: let litellm judge it
        return False


def check_model_string(model: str) -> None:
    """Raise a clear `ValueError` if neither DSPy's client nor litellm can route ``model``; spends no LM call.

    DSPy's own routing is asked first: importing litellm takes seconds, which a model DSPy serves
    natively never needs.
    """
    if _served_by_dspy(model):
        return
    import litellm

    quiet = litellm.suppress_debug_info
    litellm.suppress_debug_info = True  # litellm prints a provider list to stdout otherwise
    try:
        litellm.get_llm_provider(model)
    except Exception as exc:
        raise ValueError(
            f"Unknown model {model!r}: neither DSPy nor litellm can tell which provider serves it. Use "
            "'<provider>/<model>', e.g. 'openai/gpt-4o-mini', 'anthropic/claude-3-5-haiku-latest', "
            "'ollama_chat/llama3', or 'local/smollm2' for the embedded model, or pass a dspy.LM."
        ) from exc
    finally:
        litellm.suppress_debug_info = quiet


# A finite wait for every string-built model: litellm's own default is 6,000 s, so a stalled provider would
# hang a run for hours. Slower models can be given as a dspy.LM with their own ``timeout``.
REQUEST_TIMEOUT_S = 120.0


def resolve_lm(spec: Any, *, role: str) -> dspy.BaseLM | None:
    """Turn a user's model spec into an LM.

    A model string becomes ``dspy.LM(spec, timeout=REQUEST_TIMEOUT_S)`` with DSPy's default engine
    (``"auto"``): providers that DSPy serves natively (OpenAI, Anthropic, Gemini, Ollama, ...) fail at
    once with DSPy's own configuration errors ("no API key found ... set OPENAI_API_KEY") and bound
    every wait, and everything else (the embedded ``local/`` models among them) goes through litellm.

    Args:
        spec: ``None`` (decided later), a `dspy.BaseLM`, or a litellm model string such as
            ``"openai/gpt-4o-mini"``.
        role: The argument name, for error messages.
    """
    if spec is None or isinstance(spec, dspy.BaseLM):
        return spec
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"{role} is an empty string; pass a litellm model string or a dspy.LM")
        check_model_string(spec)
        return dspy.LM(spec, timeout=REQUEST_TIMEOUT_S)
    raise TypeError(f"{role} must be a dspy.LM or a litellm model string, got {type(spec).__name__}")


LOCAL_MAX_TOKENS = 512  # the longest proposal of a local or text-completion prompt model, unless told otherwise
LOCAL_TASK_SETTINGS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 48}
"""A local task model's settings: greedy (the paper scores instructions at temperature 0), short answers."""
LOCAL_CHAT_SETTINGS: dict[str, Any] = {"temperature": 1.0, "max_tokens": 256}
"""The chat form of a local prompt model, for optimizers that prompt through DSPy's adapters (COPRO, MIPROv2)."""


def optimizer_model(
    spec: str, *, family: str = "auto", max_tokens: int | None = LOCAL_MAX_TOKENS
) -> tuple[dspy.BaseLM, str]:
    """The prompt (optimizer) model for a litellm model string, with the meta-prompt family to use.

    ``"auto"`` resolves with `dspy_opro.families.meta_prompt_family`. The LM has the kind the family's
    meta-prompt is written for (`dspy_opro.families.MODEL_TYPES`): a ``"base"`` model is a text-completion
    LM that sends the meta-prompt unchanged (`dspy_opro.local.text_lm`); the others are chat LMs.

    Args:
        spec: A litellm model string, e.g. ``"local/smollm2"`` or ``"openai/gpt-4o-mini"``.
        family: ``"auto"``, ``"chat"``, ``"paper"`` or ``"base"``.
        max_tokens: Longest reply; ``None`` keeps the provider's default for remote chat models
            (local and text-completion models always get a cap, `LOCAL_MAX_TOKENS` by default).

    Returns:
        The LM and the resolved family.
    """
    from .local import local_lm, text_lm

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the prompt model must be a litellm model string such as 'local/smollm2', got {spec!r}")
    if family == "auto":
        family = meta_prompt_family(spec)
    check_family(family, tuple(MODEL_TYPES), argument="family")
    model_type = MODEL_TYPES[family]
    capped = LOCAL_MAX_TOKENS if max_tokens is None else max_tokens
    if is_local_model(spec):  # a Python generator has no model file to check
        return local_lm(spec, model_type=model_type, max_tokens=capped, check=not serves_generator(spec)), family
    if model_type == "text":
        check_model_string(spec)
        return text_lm(spec, max_tokens=capped), family
    lm = resolve_lm(spec, role="prompt_model")
    return (lm if max_tokens is None else lm.copy(max_tokens=max_tokens)), family


def lm_name(lm: dspy.BaseLM | None) -> str | None:
    """A printable, secret-free name for an LM (its model string)."""
    return None if lm is None else str(getattr(lm, "model", type(lm).__name__))


@dataclass
class ModelSetup:
    """The models of one run, as `setup_models` sets them up.

    Attributes:
        task_lm: Runs the program, greedily.
        adapter: `dspy_opro.local.SmallModelAdapter` for a local task model (DSPy's ChatAdapter fails to
            parse most of a 135M model's replies), else ``None`` (DSPy's default).
        prompt_lm: The prompt model in the form its meta-prompt family wants (``None`` without one).
        meta_prompt: That family: ``"base"`` (a list continued as plain text) for local models, ``"chat"``
            otherwise, unless one was asked for.
        prompt_chat_lm: The same prompt model as a chat LM, for optimizers that prompt through DSPy's
            adapters (COPRO, MIPROv2).
    """

    task_lm: dspy.BaseLM | None
    adapter: dspy.Adapter | None
    prompt_lm: dspy.BaseLM | None
    meta_prompt: str
    prompt_chat_lm: dspy.BaseLM | None

    def context(self, **overrides: Any):
        """A ``dspy.context`` that runs programs on the task model (and its adapter)."""
        settings: dict[str, Any] = {"lm": self.task_lm}
        if self.adapter is not None:
            settings["adapter"] = self.adapter
        return dspy.context(**{**settings, **overrides})


def setup_models(
    task_model: str | None = None,
    prompt_model: str | None = None,
    *,
    meta_prompt: str = "auto",
    answer_tokens: int = LOCAL_TASK_SETTINGS["max_tokens"],
    proposal_tokens: int | None = LOCAL_MAX_TOKENS,
    cache: bool = True,
) -> ModelSetup:
    """Set up the models of a run from litellm model strings: the package's one model-setup policy.

    - The task model answers greedily. A local one (``local/...``) also answers in at most
      ``answer_tokens`` tokens and gets `dspy_opro.local.SmallModelAdapter`.
    - The prompt model is `optimizer_model`'s for ``meta_prompt``, with replies of at most
      ``proposal_tokens`` tokens; its chat form (for COPRO and MIPROv2) is, for a local model, sampled at
      temperature 1 with 256 tokens (`LOCAL_CHAT_SETTINGS`).

    Args:
        task_model: The task model's string, or ``None`` for none.
        prompt_model: The prompt model's string, or ``None`` for none.
        meta_prompt: ``"auto"`` or a family name (see `optimizer_model`).
        answer_tokens: The longest answer of a local task model.
        proposal_tokens: The longest reply of the prompt model (``None``: the provider's default for a
            remote chat model).
        cache: DSPy's cache for every LM.

    Returns:
        The models, ready for ``with setup.context(): ...``.
    """
    from .local import SmallModelAdapter, local_lm

    task_lm, adapter = None, None
    if task_model is not None:
        if is_local_model(task_model):
            settings = {**LOCAL_TASK_SETTINGS, "max_tokens": answer_tokens}
            check = not serves_generator(task_model)
            task_lm = local_lm(task_model, **settings, cache=cache, check=check)
            adapter = SmallModelAdapter()
        else:
            task_lm = resolve_lm(task_model, role="task_model").copy(temperature=0.0, cache=cache)
    prompt_lm = chat_lm = None
    family = meta_prompt if meta_prompt != "auto" or prompt_model is None else meta_prompt_family(prompt_model)
    if prompt_model is not None:
        prompt_lm, family = optimizer_model(prompt_model, family=meta_prompt, max_tokens=proposal_tokens)
        prompt_lm = prompt_lm.copy(cache=cache)
        if is_local_model(prompt_model):
            chat_lm = local_lm(
                prompt_model, **LOCAL_CHAT_SETTINGS, cache=cache, check=not serves_generator(prompt_model)
            )
        else:
            chat_lm = resolve_lm(prompt_model, role="prompt_model").copy(cache=cache)
    return ModelSetup(task_lm, adapter, prompt_lm, family, chat_lm)
