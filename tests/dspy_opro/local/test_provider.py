"""The litellm provider on the real model: usage, sampling, errors, streaming."""

import pytest
from local_helpers import ask, needs_model


@needs_model
def test_litellm_chat_completion_usage_and_finish_reason(litellm):
    response = litellm.completion(model="local/smollm2", messages=ask("France"), temperature=0, max_tokens=16)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    usage = response.usage
    assert usage.prompt_tokens > 5 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    again = litellm.completion(model="local/smollm2", messages=ask("France"), temperature=0, max_tokens=16)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic
    short = litellm.completion(model="local/smollm2", messages=ask("France"), temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


@needs_model
def test_sampling_n_seed_and_stop(litellm):
    story = [{"role": "user", "content": "Write one sentence about a cat."}]

    def sample(**kwargs):
        response = litellm.completion(model="local/smollm2", messages=story, temperature=1.0, max_tokens=12, **kwargs)
        return [choice.message.content for choice in response.choices]

    seeded = sample(n=3, seed=11)
    assert len(seeded) == 3
    assert sample(n=3, seed=11) == seeded  # the seed makes sampling reproducible
    assert len(set(seeded)) > 1  # choice i uses seed + i
    assert sample(n=3, seed=12) != seeded
    assert sample(n=3) != sample(n=3)  # without a seed, every call samples afresh

    counted = litellm.text_completion(model="local/smollm2", prompt="1, 2, 3, 4, 5, 6,", temperature=0, max_tokens=12)
    assert "," in counted.choices[0].text
    stopped = litellm.text_completion(
        model="local/smollm2", prompt="1, 2, 3, 4, 5, 6,", temperature=0, max_tokens=12, stop=[","]
    )
    assert stopped.choices[0].text.strip() == "7"
    assert stopped.choices[0].finish_reason == "stop"


@needs_model
def test_errors_for_long_prompts_bad_settings_and_unknown_parameters(litellm, caplog):
    with pytest.raises(litellm.ContextWindowExceededError, match="n_ctx=256"):
        litellm.text_completion(model="local/smollm2", prompt="word " * 600, n_ctx=256, max_tokens=5)
    with pytest.raises(litellm.BadRequestError, match="max_tokens must be at least 1"):
        litellm.completion(model="local/smollm2", messages=ask("France"), max_tokens=0)
    with caplog.at_level("WARNING", logger="dspy_opro.local.provider"):
        for _ in range(2):
            litellm.completion(
                model="local/smollm2", messages=ask("France"), max_tokens=2, logit_bias={"1": 5}, temperature=0
            )
    assert sum("logit_bias" in record.getMessage() for record in caplog.records) == 1  # warned once


@needs_model
def test_streaming_delivers_the_completion(litellm):
    chunks = litellm.completion(
        model="local/smollm2", messages=ask("France"), temperature=0, max_tokens=12, stream=True
    )
    assert "Paris" in "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
