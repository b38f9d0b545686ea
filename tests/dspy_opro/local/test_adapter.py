"""`SmallModelAdapter`: the layout it sends and the replies it reads, on scripted and real models."""

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError
from local_helpers import RecordingEngine, needs_model

from dspy_opro.local import (
    SmallModelAdapter,
)
from dspy_opro.local.lm import request_prompt
from dspy_opro.tasks import demo


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
