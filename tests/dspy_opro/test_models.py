"""The model-setup policy: model strings to the task model, its adapter and the prompt model of a family."""

import dspy
import pytest

from dspy_opro import ModelSetup, setup_models
from dspy_opro.local import SmallModelAdapter, register_generator, unregister_generator
from dspy_opro.models import LOCAL_CHAT_SETTINGS, optimizer_model


@pytest.fixture
def local_name():
    register_generator("setup-test", lambda request: "ok")
    yield "local/setup-test"
    unregister_generator("setup-test")


def test_a_local_task_model_gets_the_small_model_adapter_and_short_greedy_answers(local_name):
    models = setup_models(local_name, local_name, answer_tokens=12, proposal_tokens=40, cache=False)
    assert isinstance(models.adapter, SmallModelAdapter)
    assert models.task_lm.kwargs["temperature"] == 0.0 and models.task_lm.kwargs["max_tokens"] == 12
    assert models.task_lm.cache is False
    assert models.meta_prompt == "base" and models.prompt_lm.model_type == "text"  # a list continued as text
    assert models.prompt_lm.kwargs["max_tokens"] == 40
    chat = models.prompt_chat_lm
    assert chat.model_type == "chat" and {k: chat.kwargs[k] for k in LOCAL_CHAT_SETTINGS} == LOCAL_CHAT_SETTINGS


def test_a_remote_task_model_answers_greedily_with_dspy_s_adapter():
    models = setup_models("openai/gpt-4o-mini", "openai/gpt-4o-mini", proposal_tokens=None)
    assert models.adapter is None and models.task_lm.kwargs["temperature"] == 0.0
    assert "max_tokens" not in models.task_lm.kwargs or models.task_lm.kwargs["max_tokens"] != 48
    assert models.meta_prompt == "chat" and models.prompt_lm.model_type == "chat"
    assert models.prompt_chat_lm.model == "openai/gpt-4o-mini"
    paper = setup_models(prompt_model="openai/gpt-4o-mini", meta_prompt="paper")
    assert paper.task_lm is None and paper.meta_prompt == "paper" and paper.prompt_lm.kwargs["max_tokens"] == 512


def test_the_context_runs_programs_on_the_task_model_and_its_adapter(local_name):
    models = setup_models(local_name)
    with models.context():
        assert dspy.settings.lm is models.task_lm and dspy.settings.adapter is models.adapter
    remote = ModelSetup(dspy.LM("openai/gpt-4o-mini"), None, None, "chat", None)
    with remote.context(num_threads=3):
        assert dspy.settings.lm is remote.task_lm and dspy.settings.num_threads == 3


def test_the_prompt_model_is_built_for_its_family():
    assert optimizer_model("openai/gpt-4o-mini", family="base")[0].model_type == "text"
    with pytest.raises(ValueError, match="family must be one of"):
        optimizer_model("openai/gpt-4o-mini", family="poem")
    with pytest.raises(ValueError, match="Unknown model"):
        setup_models("not-a-provider-model-xyz")
