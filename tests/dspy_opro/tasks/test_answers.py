"""The paper's answer checking: reading numbers, matching answers by kind."""

import pytest

from dspy_opro.tasks import (
    answers_match,
    extract_number,
)


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is 72.", 72.0),
        ("She earned $1,250 in total. #### 1250", 1250.0),
        ("48 + 24 = 72, so the answer is: $72", 72.0),
        ("First 3, then 5, finally 8", 8.0),
        ("Answer: -4.5%", -4.5),
        ("the answer is 3/4", 0.75),
        ("no number here", None),
        ("", None),
        (None, None),
        (42, 42.0),
        ("There are 8 * 8 = 64 chairs in total.", 64.0),
        ("The answer is 12. Then 3 more.", 12.0),
        ("6 * 2 = 12\n#### 12\nThe answer is: 12 dollars", 12.0),
        ("I think it is 2.5 or 7", 7.0),
    ],
)
def test_extract_number(text, value):
    assert extract_number(text) == value


@pytest.mark.parametrize(
    "prediction, gold, kind, ok",
    [
        ("So the answer is (B).", "(B)", "multiple_choice", True),
        ("(A) then no, the answer is (C)", "(C)", "multiple_choice", True),
        ("B", "(B)", "multiple_choice", True),
        ("The answer is heptagon", "(B)", "multiple_choice", True),
        ("The answer is circle", "(B)", "multiple_choice", False),
        ("True", "True", "boolean", True),
        ("yes", "True", "boolean", True),
        ("The argument is invalid", "valid", "boolean", False),
        ("It is not valid, so: invalid", "invalid", "boolean", True),
        ("maybe", "False", "boolean", False),
        ("the answer is 24", "24", "numeric", True),
        ("the answer is 25", "24", "numeric", False),
        ("syndrome therefrom", "syndrome therefrom", "free_form", True),
        ("Sorted: Syndrome, therefrom.", "syndrome therefrom", "free_form", True),
        ("therefrom syndrome", "syndrome therefrom", "free_form", False),
    ],
)
def test_answers_match(prediction, gold, kind, ok):
    question = "Which shape?\nOptions:\n(A) circle\n(B) heptagon\n(C) kite"
    assert answers_match(prediction, gold, kind=kind, question=question) is ok
