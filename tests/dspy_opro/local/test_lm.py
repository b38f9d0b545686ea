"""``dspy.LM`` on the local provider: the text-completion engine, `text_lm` and both DSPy engines."""

import asyncio

import dspy
from local_helpers import ask, needs_model

from dspy_opro.local import (
    gguf,
    is_local_lm,
    is_text_lm,
    local_lm,
    text_lm,
)
from dspy_opro.local.lm import TextCompletionEngine, request_prompt


def test_text_engine_sends_the_prompt_unchanged(monkeypatch, litellm):
    calls = []

    def fake_text_completion(**kwargs):
        calls.append(kwargs)
        return litellm.TextCompletionResponse(
            model=kwargs["model"],
            choices=[{"text": " continued", "index": 0, "finish_reason": "stop"}],
            usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        )

    monkeypatch.setattr(litellm, "text_completion", fake_text_completion)
    lm = text_lm("local/smollm2", cache=False)
    assert is_text_lm(lm) and lm.model_type == "text"
    assert not is_text_lm(dspy.LM("local/smollm2", engine="litellm"))
    assert is_local_lm(lm) and not is_local_lm(dspy.LM("openai/gpt-4o-mini"))
    prompt = "Precision: 50 <TEXT>Solve it.</TEXT>\nPrecision: 60 <TEXT>"
    out = lm.copy(temperature=1.0, rollout_id=3)(prompt, max_tokens=20, stop=["</TEXT>"], seed=7)
    assert out == [" continued"]
    sent = calls[-1]
    assert sent["prompt"] == prompt
    assert sent["model"] == "local/smollm2"
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["seed"]) == (1.0, 20, ["</TEXT>"], 7)
    assert "rollout_id" not in sent
    state = lm.dump_state()
    assert dspy.LM.load_state(state, allow_custom_lm_class=True).model_type == "text"


def test_request_prompt_joins_messages_without_roles():
    request = dspy.lm15.request_from_openai_chat(
        {"model": "m/x", "messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "B"}]}
    )
    assert request_prompt(request) == "A\n\nB"
    assert TextCompletionEngine(provider_params={"min_p": 0.1})._arguments(request)["min_p"] == 0.1


@needs_model
def test_dspy_lm_both_engines_async_and_usage(litellm):
    for lm in (
        dspy.LM("local/smollm2", engine="litellm", temperature=0, max_tokens=16, cache=False),
        dspy.LM("local/smollm2", temperature=0, max_tokens=16, cache=False),
        local_lm(temperature=0, max_tokens=16, cache=False),
    ):
        assert "Rome" in lm(messages=ask("Italy"))[0]
        assert lm.history[-1]["usage"]["completion_tokens"] > 0
        assert "Tokyo" in asyncio.run(lm.acall(messages=ask("Japan")))[0]
    response = asyncio.run(litellm.acompletion(model="local/smollm2", messages=ask("Germany"), temperature=0))
    assert "Berlin" in response.choices[0].message.content


@needs_model
def test_text_lm_continues_the_exact_prompt():
    prompt = "The capital of France is the city of"
    lm = text_lm("local/smollm2", temperature=0, max_tokens=6, cache=False)
    out = lm(prompt, stop=[".", ","])
    settings = gguf.runtime_settings("smollm2")
    direct = gguf.generate(settings, prompt=prompt, temperature=0, max_tokens=6, stop=[".", ","])
    assert out == [direct.choices[0].text] == [" Paris"]
    chat = local_lm(temperature=0, max_tokens=6, cache=False)(prompt)[0]
    assert chat != out[0]  # the chat LM applies the template; the text LM does not
    assert asyncio.run(lm.acall(prompt, stop=[".", ","])) == out

    meta = "Precision: 10 <TEXT>Answer.</TEXT>\nPrecision: 50 <TEXT>Solve the problem.</TEXT>\nPrecision: 60 <TEXT>"
    samples = [lm.copy(temperature=1.0, rollout_id=i)(meta, max_tokens=24, stop=["</TEXT>"])[0] for i in range(3)]
    assert all("</TEXT>" not in sample for sample in samples)
    assert len(set(samples)) > 1
