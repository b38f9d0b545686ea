import pytest

from dspy_opro import Exemplar, extract_instruction, render_meta_prompt

HISTORY = [("Solve it.", 61.2), ("Let's think step by step.", 72.5), ("", 10.0)]
EXEMPLARS = [Exemplar(inputs={"question": "What is 2 plus 3?"}, answer={"answer": "5"})]


def test_chat_family_golden():
    expected = """\
Your job is to write the instruction that belongs where <INS> stands. Below are instructions written so far, each with its score. Scores run from 0 to 100 and higher is better; the list goes from the lowest score to the highest.

Instruction: \nScore: 10

Instruction: Solve it.
Score: 61

Instruction: Let's think step by step.
Score: 73

Below are some problems. <INS> marks where the instruction is placed.

Problem:
<INS>
question: What is 2 plus 3?
Ground truth answer:
answer: 5

Write a new instruction that differs from every instruction above and that will score higher than all of them. Keep it concise, effective and applicable to every problem of this kind. Reply with the instruction only, starting with <INS> and ending with </INS>."""
    assert render_meta_prompt("chat", HISTORY, EXEMPLARS) == expected


def test_paper_family_golden():
    expected = """\
I have some texts, each with a score. They are listed in ascending order of score, and a higher score means better quality.

text:
Solve it.
score:
61

text:
Let's think step by step.
score:
73

The examples below show how a text is used: replace <INS> in the input with the text, then read the input and write an output. An output that differs from the given output counts as wrong; one that matches counts as right.

input:
<INS>
question: What is 2 plus 3?
output:
answer: 5

Write a new text that is different from the old ones and has a score as high as possible. Write the text in square brackets."""
    assert render_meta_prompt("paper", HISTORY, EXEMPLARS, max_instructions=2) == expected


def test_base_family_golden():
    expected = """\
Write a short text, placed where <INS> stands, that makes the answers more precise for this task: add two numbers.

Examples of the task:
question: What is 2 plus 3?
answer: 5

Precision: 10 <TEXT></TEXT>
Precision: 61 <TEXT>Solve it.</TEXT>
Precision: 73 <TEXT>Let's think step by step.</TEXT>
Precision: 83 <TEXT>"""
    assert render_meta_prompt("base", HISTORY, EXEMPLARS, task_description="add two numbers") == expected
    # Without exemplars (num_exemplars=0) the base wording is the goal line and the scored list only.
    bare = render_meta_prompt("base", HISTORY, task_description="add two numbers")
    assert bare.splitlines() == [expected.splitlines()[0], ""] + expected.splitlines()[-4:]


FAILED = [
    Exemplar(
        inputs={"question": "What is 2 plus 3?"},
        answer={"answer": "5"},
        output={"answer": "The sum\nis six"},
        feedback="Expected 5; the answer must be a number.",
    ),
    Exemplar(inputs={"question": "What is 1 plus 1?"}, answer={"answer": "2"}, output={"answer": "3"}),
]


def test_feedback_lines_in_every_family():
    chat = render_meta_prompt("chat", HISTORY, FAILED)
    assert (
        "Ground truth answer:\nanswer: 5\nThe best instruction so far gave this wrong answer:\nanswer: The sum\nis six\n"
        "Feedback on that answer:\nExpected 5; the answer must be a number.\n\nProblem:" in chat
    )
    assert "answer: 2\nThe best instruction so far gave this wrong answer:\nanswer: 3\n\nWrite a new" in chat
    assert chat.count("Feedback on that answer") == 1  # the second exemplar has no feedback

    paper = render_meta_prompt("paper", HISTORY, FAILED)
    assert "output:\nanswer: 5\nwrong output of the best text so far:\nanswer: The sum\nis six\nfeedback:\n" in paper

    base = render_meta_prompt("base", HISTORY, FAILED, task_description="add two numbers")
    assert (
        "question: What is 2 plus 3?\nanswer: 5\n(wrong answer given: The sum is six)\n"
        "(feedback: Expected 5; the answer must be a number.)\n\nquestion: What is 1 plus 1?\nanswer: 2\n"
        "(wrong answer given: 3)\n\nPrecision: 10" in base
    )
    # Exemplars without an answer of the best program show no failure lines.
    assert "wrong" not in render_meta_prompt("base", HISTORY, EXEMPLARS)


def test_history_is_ascending_capped_and_rounded():
    history = [(f"instruction {i}", float(i)) for i in range(30)] + [("half", 49.5)]
    text = render_meta_prompt("chat", history, max_instructions=3)
    shown = [line for line in text.splitlines() if line.startswith("Instruction:")]
    assert shown == ["Instruction: instruction 28", "Instruction: instruction 29", "Instruction: half"]
    assert "Score: 50" in text  # 49.5 rounds half up


def test_base_target_score_is_capped_at_100():
    text = render_meta_prompt("base", [("Perfect.", 100.0)])
    assert text.endswith("Precision: 100 <TEXT>")


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="meta_prompt must be one of"):
        render_meta_prompt("gpt", HISTORY)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("<INS>Add the numbers.</INS>", "Add the numbers."),
        ("Sure! Here it is: <ins> Add the numbers. </ins> Good luck.", "Add the numbers."),
        ("<INS>first</INS> then <INS>Second try.</INS>", "Second try."),
        ("<INS></INS><INS>Non-empty.</INS>", "Non-empty."),
        ("<INS>Unclosed instruction text\n\nTrailing chatter", "Unclosed instruction text"),
        ("The new instruction is [Think in steps.]", "Think in steps."),
        ("Compute carefully.", "Compute carefully."),
        ("Line one\nLine two without any tags", None),
        ("", None),
        ("   \n ", None),
        (None, None),
        ("[1] [2]", None),
        ("<INS>Résous le problème étape par étape.</INS>", "Résous le problème étape par étape."),
        ("<INS>一步一步地解决问题。</INS>", "一步一步地解决问题。"),
    ],
)
def test_chat_extraction(reply, expected):
    assert extract_instruction("chat", reply) == expected


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("[Take a deep breath.]", "Take a deep breath."),
        ("Old: [A] New: [Take a deep breath.]", "Take a deep breath."),
        ("no brackets but <INS>tagged</INS>", "tagged"),
        ("no format at all\nacross lines", None),
    ],
)
def test_paper_extraction(reply, expected):
    assert extract_instruction("paper", reply) == expected


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Solve the math word problem.", "Solve the math word problem."),
        ("Solve it.</TEXT>\nPrecision: 90 <TEXT>Other", "Solve it."),
        ("\n  Answer with the number.\nPrecision: 12", "Answer with the number."),
        ("Precision: 80 <TEXT>Be exact.", "Be exact."),
        ("</TEXT>", None),
    ],
)
def test_base_extraction(reply, expected):
    assert extract_instruction("base", reply) == expected


# Replies as chat models write them when they have seen DSPy's adapters: field markers, JSON, headers.
@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            "[[ ## proposed_instruction ## ]]\nRead the question, then answer with the number only.\n\n"
            "[[ ## completed ## ]]",
            "Read the question, then answer with the number only.",
        ),
        (
            "[[ ## reasoning ## ]]\nThe best instruction so far is short; add the format.\n\n"
            "[[ ## proposed_instruction ## ]]\n<INS>Answer with the number only.</INS>\n\n[[ ## completed ## ]]",
            "Answer with the number only.",
        ),
        (
            "[[ ## new_prompt ## ]]\nCount carefully, then answer.\n\n[[ ## completed ## ]]",
            "Count carefully, then answer.",
        ),
        ("[[ ## proposed_instruction ## ]]\n\n[[ ## completed ## ]]", None),
        ("[[ ## completed ## ]]", None),  # fields, none with text: nothing to read
        ('{"proposed_instruction": "Answer with a single number."}', "Answer with a single number."),
        ('{"reasoning": "short", "proposed_instruction": "Be exact."}', "Be exact."),
        ('{"a": "x", "b": "y"}', '{"a": "x", "b": "y"}'),  # not DSPy's layout: a bare line, rejected as markup
        ("[[ ## proposed_instruction ## ]]\n[Take a deep breath.]\n\n[[ ## completed ## ]]", "Take a deep breath."),
        ("[[ ## proposed_instruction ## ]]\nLine one.\nLine two.\n\n[[ ## completed ## ]]", "Line one.\nLine two."),
    ],
)
def test_dspy_layouts_are_read_for_their_instruction(reply, expected):
    assert extract_instruction("chat", reply) == expected
    assert extract_instruction("paper", reply) == expected


def test_markup_never_reaches_scoring():
    from dspy_opro.candidates import normalize_instruction, rejection_reason

    replies = ["[[ ## completed ## ]]", "## output ##", '{"a": "x", "b": "y"}', "[[ ## output ## ]]\n## answer ##"]
    for reply in replies:
        found = extract_instruction("chat", reply)
        assert found is None or rejection_reason(normalize_instruction(found)) in ("markup", "placeholder"), reply


def test_the_new_names_render_like_the_former_ones():
    history = [(f"instruction {i}", float(i)) for i in range(5)]
    assert render_meta_prompt("chat", history, max_shown=2).count("Instruction:") == 2
    import dspy_opro.meta_prompt as module

    with pytest.deprecated_call(match="display_score is deprecated; use dspy_opro.families.display_value"):
        assert module.display_score(49.5) == 50
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_instructionz'"):
        render_meta_prompt("chat", history, max_instructionz=2)
