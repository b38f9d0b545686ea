"""Python generators served by the local provider as ``local/<name>`` (no llama.cpp needed)."""

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from dspy_opro.local import (
    Generation,
    GenerationRequest,
    GeneratorError,
    ModelNotFoundError,
    SmallModelAdapter,
    completion,
    generator_names,
    generators,
    gguf,
    is_generator,
    local_lm,
    model_names,
    register_generator,
    register_model,
    unregister_generator,
)


@pytest.fixture
def names():
    """Generator names used by a test, unregistered afterwards."""
    used = []

    def name(text):
        used.append(text)
        return text

    yield name
    for text in used:
        unregister_generator(text)


class Recorder:
    """A generator that records its requests and answers with ``reply(request)``."""

    def __init__(self, reply=lambda request: "ok"):
        self.reply = reply
        self.requests = []
        self._lock = threading.Lock()

    def __call__(self, request):
        with self._lock:
            self.requests.append(request)
        return self.reply(request)


def chat(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


# --------------------------------------------------------------------------------------------
# Registration


def test_register_checks_names_functions_and_settings(names, tmp_path):
    with pytest.raises(ValueError, match="model name"):
        register_generator("a/b", str)
    with pytest.raises(ValueError, match="model name"):
        register_generator("model.gguf", str)
    with pytest.raises(ValueError, match="model name"):
        register_generator("", str)
    with pytest.raises(ValueError, match="already names a GGUF model"):
        register_generator("smollm2", str)
    with pytest.raises(TypeError, match="callable"):
        register_generator(names("not-callable"), "hello")
    with pytest.raises(ValueError, match="max_concurrency"):
        register_generator(names("zero"), str, max_concurrency=0)
    with pytest.raises(TypeError, match="count_tokens"):
        register_generator(names("bad-count"), str, count_tokens=3)
    assert not is_generator("not-callable")

    register_generator(names("toy-reg"), str)
    assert is_generator("toy-reg")
    assert "toy-reg" in generator_names()
    assert "toy-reg" in model_names() and "smollm2" in model_names()
    with pytest.raises(ValueError, match="already names a Python generator"):
        register_model("toy-reg", tmp_path / "model.gguf")
    with pytest.raises(ModelNotFoundError, match="check=False"):
        gguf.resolve_model_path("toy-reg")
    assert unregister_generator("toy-reg") is True
    assert unregister_generator("toy-reg") is False
    assert not is_generator("toy-reg")


def test_registering_again_replaces_the_generator(names, litellm):
    name = names("toy-replace")
    register_generator(name, lambda request: "first")
    register_generator(name, lambda request: "second")
    reply = litellm.completion(model=f"local/{name}", messages=chat(("user", "hi")))
    assert reply.choices[0].message.content == "second"


# --------------------------------------------------------------------------------------------
# Chat and text completions through litellm


def test_chat_completion_passes_messages_and_defaults_and_fills_usage(names, litellm):
    generator = Recorder(lambda request: f"{request.system} | {request.user}")
    register_generator(names("toy-chat"), generator)
    messages = chat(("system", "Be brief."), ("user", "first question"), ("assistant", "yes"), ("user", "two words"))
    reply = litellm.completion(model="local/toy-chat", messages=messages)

    assert reply.choices[0].message.content == "Be brief. | two words"
    assert reply.choices[0].finish_reason == "stop"
    (request,) = generator.requests
    assert isinstance(request, GenerationRequest)
    assert request.prompt is None
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.text == "Be brief.\n\nfirst question\n\nyes\n\ntwo words"
    # The defaults of the GGUF models, resolved before the generator sees them.
    assert (request.temperature, request.max_tokens, request.stop, request.seed, request.index) == (
        completion.DEFAULT_TEMPERATURE,
        completion.DEFAULT_MAX_TOKENS,
        (),
        None,
        0,
    )
    # Words counted when the generator does not count: 7 in the messages, 5 in the reply.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (7, 5, 12)


def test_generator_counts_and_finish_reason_are_kept(names, litellm):
    register_generator(
        names("toy-counts"),
        lambda request: Generation("abc", prompt_tokens=11, completion_tokens=3, finish_reason="length"),
    )
    reply = litellm.completion(model="local/toy-counts", messages=chat(("user", "hi")), max_tokens=3, temperature=0)
    assert reply.choices[0].message.content == "abc"
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (11, 3)


def test_custom_token_counter(names, litellm):
    register_generator(names("toy-chars"), lambda request: "four", count_tokens=len)
    reply = litellm.completion(model="local/toy-chars", messages=chat(("user", "abcdef")))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (6, 4)


def test_text_completion_gets_the_raw_prompt(names, litellm):
    generator = Recorder(lambda request: request.prompt[::-1])
    register_generator(names("toy-text"), generator)
    reply = litellm.text_completion(model="local/toy-text", prompt="Precision: 3 <TEXT>", temperature=0.5, max_tokens=9)
    assert reply.choices[0].text == ">TXET< 3 :noisicerP"
    (request,) = generator.requests
    assert request.messages is None
    assert request.prompt == request.user == request.text == "Precision: 3 <TEXT>"
    assert request.system == ""
    assert (request.temperature, request.max_tokens) == (0.5, 9)


def test_n_calls_the_generator_once_per_choice_with_successive_seeds(names, litellm):
    generator = Recorder(lambda request: f"seed {request.seed} choice {request.index}")
    register_generator(names("toy-n"), generator)
    reply = litellm.completion(model="local/toy-n", messages=chat(("user", "hi")), n=3, seed=7)
    assert [c.message.content for c in reply.choices] == ["seed 7 choice 0", "seed 8 choice 1", "seed 9 choice 2"]
    assert reply.usage.prompt_tokens == 1  # the prompt counted once
    assert reply.usage.completion_tokens == 12
    with pytest.raises(litellm.BadRequestError, match="n must be a positive integer"):
        litellm.completion(model="local/toy-n", messages=chat(("user", "hi")), n=0)


def test_stop_strings_cut_the_text_at_the_first_one(names, litellm):
    generator = Recorder(lambda request: "one. two END three STOP four")
    register_generator(names("toy-stop"), generator)
    reply = litellm.completion(model="local/toy-stop", messages=chat(("user", "hi")), stop=["STOP", "END", ""])
    assert reply.choices[0].message.content == "one. two "
    assert reply.choices[0].finish_reason == "stop"
    assert generator.requests[0].stop == ("STOP", "END")  # an empty stop string would cut everything
    reply = litellm.text_completion(model="local/toy-stop", prompt="x", stop="three")
    assert reply.choices[0].text == "one. two END "


def test_other_sampling_parameters_arrive_read_only_and_load_settings_are_ignored(names, litellm, caplog):
    generator = Recorder()
    register_generator(names("toy-options"), generator)
    with caplog.at_level(logging.WARNING, logger="dspy_opro.local.provider"):
        litellm.completion(model="local/toy-options", messages=chat(("user", "hi")), top_p=0.5, n_ctx=512)
    options = generator.requests[0].options
    assert options == {"top_p": 0.5}
    with pytest.raises(TypeError):
        options["top_p"] = 1.0
    assert "n_ctx" in caplog.text and "has no load settings" in caplog.text


def test_content_parts_are_flattened_and_non_text_is_refused(names, litellm):
    generator = Recorder(lambda request: request.user)
    register_generator(names("toy-parts"), generator)
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    reply = litellm.completion(model="local/toy-parts", messages=[{"role": "user", "content": parts}])
    assert reply.choices[0].message.content == "Hello, world"
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(litellm.BadRequestError, match="text messages only"):
        litellm.completion(model="local/toy-parts", messages=[{"role": "user", "content": image}])


def test_async_and_streaming_calls(names, litellm):
    register_generator(names("toy-async"), lambda request: request.user.upper())
    reply = asyncio.run(litellm.acompletion(model="local/toy-async", messages=chat(("user", "quiet"))))
    assert reply.choices[0].message.content == "QUIET"
    chunks = list(litellm.completion(model="local/toy-async", messages=chat(("user", "stream")), stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "STREAM"


# --------------------------------------------------------------------------------------------
# Errors


def test_generator_failures_are_reported_with_the_generator_name(names, litellm):
    def broken(request):
        raise RuntimeError("weights missing")

    def refusing(request):
        raise ValueError("no list in the message")

    register_generator(names("toy-broken"), broken)
    register_generator(names("toy-refusing"), refusing)
    register_generator(names("toy-wrong-type"), lambda request: 42)
    register_generator(names("toy-bad-reason"), lambda request: Generation("x", finish_reason="done"))
    register_generator(names("toy-bad-count"), lambda request: Generation("x", completion_tokens=-1))
    hi = chat(("user", "hi"))

    with pytest.raises(litellm.InternalServerError, match="'toy-broken' failed: RuntimeError: weights missing"):
        litellm.completion(model="local/toy-broken", messages=hi)
    with pytest.raises(litellm.BadRequestError, match="'toy-refusing' failed: ValueError: no list in the message"):
        litellm.completion(model="local/toy-refusing", messages=hi)
    with pytest.raises(litellm.InternalServerError, match="'toy-wrong-type' returned int; it must return a str"):
        litellm.completion(model="local/toy-wrong-type", messages=hi)
    with pytest.raises(litellm.InternalServerError, match="finish_reason='done'"):
        litellm.completion(model="local/toy-bad-reason", messages=hi)
    with pytest.raises(litellm.InternalServerError, match="completion_tokens=-1"):
        litellm.completion(model="local/toy-bad-count", messages=hi)
    with pytest.raises(litellm.NotFoundError, match="Unknown local model name 'toy-never-registered'"):
        litellm.completion(model="local/toy-never-registered", messages=hi)

    # The runtime's own exception carries the generator's as its cause.
    with pytest.raises(GeneratorError) as caught:
        generators.call_generator("toy-broken", prompt="x")
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(ModelNotFoundError, match="No generator named 'toy-never-registered'"):
        generators.call_generator("toy-never-registered", prompt="x")
    with pytest.raises(ValueError, match="exactly one of"):
        generators.call_generator("toy-broken")


def test_a_refused_request_reaches_dspy_without_retries(names):
    generator = Recorder(lambda request: (_ for _ in ()).throw(ValueError("cannot read this")))
    register_generator(names("toy-refused"), generator)
    lm = dspy.LM("local/toy-refused", engine="litellm", cache=False)
    with pytest.raises(dspy.utils.exceptions.LMError, match="cannot read this"):
        lm("hi")
    assert len(generator.requests) == 1


# --------------------------------------------------------------------------------------------
# Threads


def test_concurrent_calls_run_at_once_and_get_their_own_answers(names, litellm):
    meeting = threading.Barrier(4, timeout=30)

    def echo(request):
        meeting.wait()  # returns only when four calls are inside the generator together
        return f"answer to {request.user}"

    register_generator(names("toy-parallel"), echo)
    questions = [f"question {i}" for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(
            pool.map(
                lambda q: litellm.completion(model="local/toy-parallel", messages=chat(("user", q))),
                questions,
            )
        )
    assert [r.choices[0].message.content for r in replies] == [f"answer to {q}" for q in questions]


def test_max_concurrency_one_serialises_the_calls(names, litellm):
    lock = threading.Lock()
    active, most = [0], [0]
    entered = threading.Event()

    def one_at_a_time(request):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        entered.set()
        # Give another thread every chance to enter before this call leaves.
        threading.Event().wait(0.02)
        with lock:
            active[0] -= 1
        return request.user

    register_generator(names("toy-serial"), one_at_a_time, max_concurrency=1)
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(
            pool.map(
                lambda i: litellm.completion(model="local/toy-serial", messages=chat(("user", str(i)))),
                range(8),
            )
        )
    assert [r.choices[0].message.content for r in replies] == [str(i) for i in range(8)]
    assert entered.is_set() and most[0] == 1


# --------------------------------------------------------------------------------------------
# DSPy


def test_dspy_program_with_the_small_model_adapter_end_to_end(names):
    def arithmetic(request):
        # The adapter sends the instruction as the system message and the inputs as "Field: value" lines.
        question = request.user.removeprefix("Question: ")
        a, b = (int(x) for x in question.split("+"))
        return str(a + b) if "Add" in request.system else str(a - b)

    generator = Recorder(arithmetic)
    register_generator(names("toy-math"), generator)
    lm = dspy.LM("local/toy-math", engine="litellm", cache=False, temperature=0.0, max_tokens=8)
    program = dspy.Predict(dspy.Signature("question -> answer").with_instructions("Add the numbers."))
    examples = [dspy.Example(question=f"{a}+{a + 1}", answer=str(2 * a + 1)).with_inputs("question") for a in range(6)]

    with dspy.context(lm=lm, adapter=SmallModelAdapter()):
        assert program(question="2+3").answer == "5"
        evaluate = dspy.Evaluate(
            devset=examples,
            metric=lambda example, prediction, trace=None: example.answer == prediction.answer,
            num_threads=3,
            display_progress=False,
        )
        assert evaluate(program).score == 100.0
        wrong = dspy.Predict(dspy.Signature("question -> answer").with_instructions("Subtract."))
        assert evaluate(wrong).score == 0.0

    first = generator.requests[0]
    assert first.system == "Add the numbers."
    assert first.user == "Question: 2+3"
    assert (first.temperature, first.max_tokens) == (0.0, 8)
    assert len(generator.requests) == 1 + 2 * len(examples)
    usage = lm.history[0]["usage"]
    assert usage["completion_tokens"] == 1 and usage["prompt_tokens"] == 5


def test_local_lm_serves_a_generator_without_the_file_check(names):
    register_generator(names("toy-local-lm"), lambda request: "fine")
    with pytest.raises(ModelNotFoundError, match="Python generator"):
        local_lm("toy-local-lm")
    lm = local_lm("toy-local-lm", check=False, cache=False)
    assert lm("hi") == ["fine"]
