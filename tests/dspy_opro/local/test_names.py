"""The names of local models: one namespace, and the one test of whether a model is local."""

import dspy
import pytest

from dspy_opro.local import is_local_model, register_generator, serves_generator, unregister_generator
from dspy_opro.local.names import model_part


def test_is_local_model_takes_a_model_string_or_an_lm():
    assert is_local_model("local/smollm2") and is_local_model(dspy.LM("local/smollm2", engine="litellm"))
    assert not is_local_model("openai/gpt-4o-mini") and not is_local_model(dspy.LM("openai/gpt-4o-mini"))
    assert model_part("local//abs/model.gguf") == "/abs/model.gguf" and model_part("smollm2") == "smollm2"


def test_a_generator_name_is_known_as_one():
    register_generator("names-test", lambda request: "x")
    try:
        assert serves_generator("local/names-test") and not serves_generator("local/smollm2")
        assert not serves_generator("names-test")  # not a local model string
    finally:
        unregister_generator("names-test")
    assert not serves_generator("local/names-test")


def test_the_former_predicate_still_answers_with_a_warning():
    from dspy_opro.local import is_local_lm

    with pytest.deprecated_call(match="is_local_model"):
        assert is_local_lm(dspy.LM("local/smollm2", engine="litellm"))
