"""Meta-prompt families as objects, for both loops, and the one rule that picks a family for a model."""

import dspy
import pytest

from dspy_opro import FAMILIES, extract_instruction, meta_prompt_family, render_meta_prompt
from dspy_opro.families import Family, Scored, check_family, choose_shown, display_value, resolve_family
from dspy_opro.local import text_lm
from dspy_opro.meta_prompt import Exemplar, get_family
from dspy_opro.numeric import LinearRegression, TravelingSalesman
from dspy_opro.numeric import render_meta_prompt as render_numeric


def test_each_instruction_family_holds_its_writer_reader_stop_strings_and_lm_kind():
    assert list(FAMILIES) == ["chat", "paper", "base"]
    assert {name: f.model_type for name, f in FAMILIES.items()} == {"chat": "chat", "paper": "chat", "base": "text"}
    assert FAMILIES["base"].stop == ("</TEXT>",) and FAMILIES["chat"].stop == FAMILIES["paper"].stop == ()
    history = [("Add them.", 40.0), ("Add the numbers.", 70.0)]
    exemplars = [Exemplar({"question": "1 + 1?"}, {"answer": "2"})]
    for name, family in FAMILIES.items():
        shown = choose_shown([Scored(t, s) for t, s in history], max_shown=20)
        written = family.write(shown, exemplars=exemplars, task_description="adding")
        assert written == render_meta_prompt(name, history, exemplars, task_description="adding")
        assert family.read("<INS>Sum up.</INS>") == extract_instruction(name, "<INS>Sum up.</INS>") == "Sum up."


def test_families_are_looked_up_by_name_with_a_clear_error():
    assert get_family("paper") is FAMILIES["paper"]
    with pytest.raises(ValueError, match=r"meta_prompt must be one of \('chat', 'paper', 'base'\), got 'poem'"):
        get_family("poem")
    with pytest.raises(ValueError, match=r"style must be one of \('auto', 'chat', 'base'\)"):
        check_family("paper", ("chat", "base"), argument="style", auto=True)


def test_a_numeric_problem_gives_its_families_in_its_own_wording():
    problem = TravelingSalesman(points=[(0, 0), (3, 4), (-5, 2), (10, -1)])
    base = problem.family("base")
    assert isinstance(base, Family) and base.model_type == "text" and base.stop == ("</trace>",)
    history = [Scored((0, 1, 2, 3), 40.2), Scored((0, 2, 1, 3), 30.7)]
    assert base.write(choose_shown(history, max_shown=10, minimize=True)) == render_numeric(problem, history, "base")
    assert base.read("0,3,2,1") == (0, 3, 2, 1)
    chat = LinearRegression(seed=0).family("chat")
    assert chat.model_type == "chat" and chat.stop == () and chat.read("so [3, 4]") == (3, 4)
    with pytest.raises(ValueError, match="meta_prompt must be one of"):
        problem.family("paper")  # the numeric problems write no "paper" wording


def test_one_rule_picks_the_family_of_a_prompt_model():
    assert meta_prompt_family("local/smollm2") == meta_prompt_family(text_lm("openai/gpt-3.5-turbo-instruct")) == "base"
    assert meta_prompt_family("openai/gpt-4o-mini") == meta_prompt_family(dspy.LM("openai/gpt-4o-mini")) == "chat"
    assert resolve_family("auto", "local/smollm2", ("chat", "base")) == "base"
    assert resolve_family("chat", "local/smollm2", ("chat", "base")) == "chat"


def test_entries_are_shown_best_last_with_integer_values():
    history = [Scored("a", 3.0), Scored("b", 1.0), Scored("c", 2.0)]
    assert [s.solution for s in choose_shown(history, max_shown=2)] == ["c", "a"]
    assert [s.solution for s in choose_shown(history, max_shown=2, minimize=True)] == ["c", "b"]
    assert (display_value(49.5), display_value(49.4), display_value(824.45)) == (50, 49, 824)
