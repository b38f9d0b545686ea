"""What the meta-prompt shows the prompt model, and the paper's loop as one setting.

Scripted models (tests/opro_scripted.py): the task model answers "What is A plus B?" only when the
instruction has the keyword its kind needs ("number" for even A, "only" for odd A), so "Answer number."
scores 50 and answers every odd-A question wrongly.
"""

import re

import dspy
import pytest
from opro_scripted import VOCABULARY, ScriptedOptimizer, make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.optimizer import PAPER_SETTINGS
from dspy_opro.testing import scripted_lm

SHOWN = re.compile(r"Instruction: (.*)\nScore: (\d+)")


class HalfBadOptimizer(ScriptedOptimizer):
    """Every other sample proposes an instruction without either keyword (it scores 0)."""

    def __call__(self, call):
        reply = super().__call__(call)
        k = self._counters[call.user] - 1
        return f"<INS>Reply {VOCABULARY[k % len(VOCABULARY)]}.</INS>" if k % 2 == 0 else reply


def run(optimizer, trainset, metric=metric, **settings):
    options = dict(
        prompt_model=optimizer.lm(),
        task_model=task_lm(),
        meta_prompt="chat",
        num_steps=2,
        candidates_per_step=6,
        num_threads=2,
        initial_instructions="Answer number.",
        show_progress=False,
    )
    options.update(settings)
    return OPRO(metric, **options).compile(dspy.Predict("question -> answer"), trainset=trainset)


@pytest.mark.parametrize("show_estimates", [False, True])
def test_under_screening_the_meta_prompt_shows_full_set_scores_unless_asked(show_estimates):
    trainset = make_trainset(32)
    optimizer = HalfBadOptimizer()
    program = run(optimizer, trainset, screening=True, show_estimates=show_estimates)
    evaluated = {c["instruction"]: c["evaluated"] for c in program.candidate_programs}
    screened_out = {text for text, n in evaluated.items() if n < len(trainset)}
    assert any(text.startswith("Reply") for text in screened_out)  # screening stopped the bad proposals early
    shown = {text for prompt in optimizer.prompts[1:] for text, _ in SHOWN.findall(prompt)}
    if show_estimates:
        assert shown & screened_out
    else:
        assert shown and not shown & screened_out
        assert all(evaluated[text] == len(trainset) for text in shown)


def test_in_the_minibatch_schedule_the_meta_prompt_shows_every_candidate_with_its_minibatch_score():
    from opro_scripted import answer_for

    from dspy_opro.screening import minibatch

    trainset = make_trainset(32)
    optimizer = HalfBadOptimizer()
    program = run(optimizer, trainset, screening="minibatch", seed=0)
    evaluated = {c["instruction"]: c["evaluated"] for c in program.candidate_programs}
    assert any(n < len(trainset) for n in evaluated.values())  # most candidates cost the minibatch only
    batch = [trainset[j] for j in minibatch(len(trainset), 0)]
    shown = {text: int(score) for prompt in optimizer.prompts[1:] for text, score in SHOWN.findall(prompt)}
    assert {text for text, n in evaluated.items() if n < len(trainset)} & set(shown)
    for text, score in shown.items():
        right = sum(answer_for(e.question, text) == e.answer for e in batch)
        assert score == round(100 * right / len(batch))


def gepa_metric(gold, pred, trace, pred_name, pred_trace):
    right = metric(gold, pred)
    return dspy.Prediction(score=float(right), feedback="" if right else f"The sum is {gold.answer}.")


def test_feedback_shows_the_best_programs_wrong_answers_and_the_metrics_feedback():
    optimizer = ScriptedOptimizer()
    run(optimizer, make_trainset(12), metric=gepa_metric, screening=False, num_steps=1, num_exemplars=3)
    prompt = optimizer.prompts[0]
    questions = re.findall(r"question: What is (\d+) plus (\d+)\?", prompt)
    assert len(questions) == 3
    # best_wrong: the exemplars are questions "Answer number." gets wrong (odd A), each with its wrong answer.
    assert all(int(a) % 2 == 1 for a, _ in questions)
    for a, b in questions:
        total = int(a) + int(b)
        assert (
            f"Ground truth answer:\nanswer: {total}\nThe best instruction so far gave this wrong answer:\n"
            f"answer: roughly {total + 1}\nFeedback on that answer:\nThe sum is {total}." in prompt
        )


def test_without_feedback_the_exemplars_show_their_answers_only():
    optimizer = ScriptedOptimizer()
    run(optimizer, make_trainset(12), metric=gepa_metric, screening=False, num_steps=1, feedback=False)
    assert "Ground truth answer:" in optimizer.prompts[0]
    assert "wrong answer" not in optimizer.prompts[0] and "Feedback" not in optimizer.prompts[0]


def test_paper_defaults_are_the_papers_loop_and_any_setting_can_still_change():
    lm = scripted_lm(lambda call: "[Answer.]")
    opt = OPRO.paper_defaults(metric, prompt_model=lm, task_model=lm)
    assert {name: getattr(opt, name) for name in PAPER_SETTINGS} == PAPER_SETTINGS
    assert PAPER_SETTINGS == {
        "meta_prompt": "paper",
        "num_steps": 20,
        "candidates_per_step": 8,
        "temperature": 1.0,
        "max_shown": 20,
        "num_exemplars": 3,
        "exemplar_selection": "random",
        "screening": False,
        "feedback": False,
    }
    assert OPRO.paper_defaults(metric, num_steps=3).num_steps == 3
    # OPRO's own defaults differ from the paper's exactly in the search settings this package adds.
    default = OPRO(metric)
    differs = {name for name, value in PAPER_SETTINGS.items() if getattr(default, name) != value}
    assert differs == {"meta_prompt", "exemplar_selection", "screening", "feedback"}


def test_the_paper_loop_scores_every_candidate_in_full_and_asks_in_the_papers_words():
    optimizer = ScriptedOptimizer()
    trainset = make_trainset(12)
    opt = OPRO.paper_defaults(
        gepa_metric,
        prompt_model=optimizer.lm(),
        task_model=task_lm(),
        num_steps=2,
        num_threads=2,
        initial_instructions="Answer number.",
        show_progress=False,
    )
    program = opt.compile(dspy.Predict("question -> answer"), trainset=trainset)
    assert all(c["evaluated"] == len(trainset) for c in program.candidate_programs)
    assert len(program.candidate_programs) > 2
    for prompt in optimizer.prompts:
        assert prompt.startswith("I have some texts, each with a score.")
        assert "wrong output" not in prompt and "feedback" not in prompt
