import pytest

from dspy_opro import dedup_key, normalize_instruction
from dspy_opro.candidates import rejection_reason


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  **Solve the problem.**  ", "Solve the problem."),
        ('"Solve the problem."', "Solve the problem."),
        ("\u201cRésous le problème.\u201d", "Résous le problème."),
        ("solve  the\tproblem.", "Solve the problem."),
        ("Instruction: take a deep breath.", "Take a deep breath."),
        ("Step 1: read.\n\n  step 2:   answer.  ", "Step 1: read.\nstep 2: answer."),
        ("élève attentivement", "Élève attentivement"),
        ("一步一步地解决问题。", "一步一步地解决问题。"),
        ("", ""),
        ("   ", ""),
        ("'", "'"),
    ],
)
def test_normalize(raw, expected):
    assert normalize_instruction(raw) == expected


def test_dedup_key_treats_case_spacing_width_and_final_period_as_same():
    assert dedup_key("Solve it.") == dedup_key("solve  IT")
    assert dedup_key("Ｓｏｌｖｅ ｉｔ") == dedup_key("Solve it")  # full-width forms fold under NFKC
    assert dedup_key("Straße") == dedup_key("STRASSE")  # case folding, not lower()
    assert dedup_key("Solve it.") != dedup_key("Solve it twice.")


def test_dedup_key_handles_any_unicode():
    for text in ["🙂 emoji", "\u0000 nul", "\udcff lone surrogate", "مرحبا", ""]:
        assert isinstance(dedup_key(text), str)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Solve it.", None),
        ("", "empty"),
        ("x" * 501, "too_long"),
        ("Put <INS> here.", "placeholder"),
        ("Close </text> tags.", "placeholder"),
    ],
)
def test_rejection_reasons(text, reason):
    assert rejection_reason(text) == reason


def test_length_limit_and_extra_filter():
    assert rejection_reason("x" * 20, max_length=20) is None
    assert rejection_reason("x" * 21, max_length=20) == "too_long"
    no_digits = lambda text: not any(ch.isdigit() for ch in text)  # noqa: E731
    assert rejection_reason("Use 3 steps.", extra_filter=no_digits) == "filtered"
    assert rejection_reason("Use three steps.", extra_filter=no_digits) is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Use the INS marker to begin.", "placeholder"),  # the reference's INS check
        ("Read the INSTRUCTIONS below, then answer.", None),  # the word, not a part of one
        ("[[ ## proposed_instruction ## ]]", "markup"),
        ("[[ ## completed ## ]]", "markup"),
        ("## output ##", "markup"),
        ("[ ## answer ## ]", "markup"),
        ("### Instruction", "markup"),
        ("## Task\n### Steps", "markup"),
        ('{"proposed_instruction": "Be precise."}', "markup"),
        ("## Steps\nRead the question, then answer with a number.", None),  # a heading over real text is text
        ("Answer in the form #1, #2 and so on.", None),
    ],
)
def test_non_instructions_are_rejected(text, reason):
    assert rejection_reason(text) == reason
