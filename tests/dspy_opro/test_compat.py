"""The one-line swap: DSPy's documented COPRO, MIPROv2 and GEPA call sites run with only the class changed.

The models are scripted (tests/opro_scripted.py): the task model answers correctly only when its
instruction holds the keyword a question needs, and the prompt model extends the best instruction
it is shown, so a run that returns a better instruction has really fed its history back.
"""

import logging
import re

import dspy
import pytest
from dspy.evaluate.evaluate import EvaluationResult
from dspy.utils import DummyLM
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback
from example_scripts import ROOT
from opro_scripted import ScriptedOptimizer, answer_for, chat_reply, instruction_of, make_trainset, metric, task_lm

from dspy_opro import OPRO, compat
from dspy_opro.optimizer import RunDeclinedError
from dspy_opro.testing import scripted_lm

OPRO_AS = {"COPRO": OPRO, "MIPROv2": OPRO, "GEPA": OPRO}  # the only change a user makes: the class


def start_score(student, trainset):
    """The training score of the student's own instruction under the scripted task model."""
    instruction = student.predictors()[0].signature.instructions
    return 100.0 * sum(answer_for(e.question, instruction) == e.answer for e in trainset) / len(trainset)


def cot_task_lm() -> dspy.LM:
    """The scripted task model for ChainOfThought programs (a reasoning field, then the answer)."""

    def reply(call):
        question = re.search(r"What is \d+ plus \d+\?", call.user).group(0)
        return chat_reply({"reasoning": "Add the numbers.", "answer": answer_for(question, instruction_of(call))})

    return scripted_lm(reply, model="scripted/task")


# ------------------------------------------------------------------------------------------- COPRO
def test_copro_cheatsheet_call_site():
    COPRO = OPRO_AS["COPRO"]
    program, trainset = dspy.Predict("question -> answer"), make_trainset(8)
    optimizer = ScriptedOptimizer()
    with dspy.context(lm=task_lm()):
        eval_kwargs = dict(num_threads=4, display_progress=True, display_table=0)
        copro_teleprompter = COPRO(
            prompt_model=optimizer.lm(), metric=metric, breadth=4, depth=3, init_temperature=1.4, verbose=False
        )
        compiled = copro_teleprompter.compile(program, trainset=trainset, eval_kwargs=eval_kwargs)

    params = copro_teleprompter.get_params()
    assert (params["candidates_per_step"], params["num_steps"], params["temperature"]) == (4, 3, 1.4)
    assert compiled.score > start_score(program, trainset)
    assert compiled.call_counts["prompt_lm"]["calls"] == 3 * 4  # depth x breadth
    best = compiled.candidate_programs[0]
    assert best["program"].predictors()[0].signature.instructions == compiled.signature.instructions
    assert best["score"] == compiled.score and compiled.total_calls == compiled.call_counts["metric_calls"]
    assert len(compiled.predictors()) == 1  # the candidates' programs are not predictors of the result


def test_copro_runs_on_two_examples_and_warns_about_coarse_scores(caplog):
    with caplog.at_level(logging.WARNING, logger="dspy_opro"):
        compiled = OPRO(
            prompt_model=ScriptedOptimizer().lm(), task_model=task_lm(), metric=metric, breadth=2, depth=1
        ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(2), eval_kwargs={})
    assert compiled.score in (0.0, 50.0, 100.0)
    assert "trainset has 2 example(s): every score is one of 0 / 50 / 100" in caplog.text


# ------------------------------------------------------------------------------------------- MIPROv2
def test_miprov2_api_page_call_site():
    MIPROv2 = OPRO_AS["MIPROv2"]
    trainset = make_trainset(8)
    optimizer = ScriptedOptimizer()
    with dspy.context(lm=cot_task_lm()):
        teleprompter = MIPROv2(metric=metric, auto="medium", prompt_model=optimizer.lm())
        optimized_program = teleprompter.compile(dspy.ChainOfThought("question -> answer"), trainset=trainset)
    preset = compat.AUTO_PRESETS["medium"]
    assert optimized_program.score > 0.0
    assert optimized_program.call_counts["metric_calls"] <= preset.budget(len(trainset), 0)
    assert teleprompter.get_params()["candidates_per_step"] == preset.candidates_per_step


def test_miprov2_zero_shot_call_site():
    MIPROv2 = OPRO_AS["MIPROv2"]
    program, trainset = dspy.Predict("question -> answer"), make_trainset(8)
    with dspy.context(lm=task_lm()):
        teleprompter = MIPROv2(metric=metric, auto="light", num_threads=4, prompt_model=ScriptedOptimizer().lm())
        zeroshot_optimized_program = teleprompter.compile(
            program.deepcopy(),
            trainset=trainset,
            max_bootstrapped_demos=0,
            max_labeled_demos=0,
            requires_permission_to_run=False,
        )
    assert zeroshot_optimized_program.score > start_score(program, trainset)
    assert zeroshot_optimized_program.call_counts["metric_calls"] <= compat.AUTO_PRESETS["light"].budget(8, 0)


def test_miprov2_manual_settings_with_num_trials_as_the_budget():
    train, val = make_trainset(8), make_trainset(4, offset=40)
    teleprompter = OPRO(
        metric, prompt_model=ScriptedOptimizer().lm(), task_model=task_lm(), auto=None, num_candidates=4, seed=9
    )
    program = teleprompter.compile(
        dspy.Predict("question -> answer"),
        trainset=train,
        valset=val,
        num_trials=6,
        minibatch=False,
        minibatch_full_eval_steps=10,
        max_bootstrapped_demos=0,
        max_labeled_demos=0,
        seed=3,
    )
    assert program.call_counts["metric_calls"] <= (6 + 1) * len(train) + 5 * len(val)
    assert teleprompter.seed == 9 and teleprompter.screening  # compile's settings apply to that call only


def test_miprov2_few_shot_settings_are_refused_with_the_way_to_combine():
    with pytest.raises(ValueError, match=r"max_bootstrapped_demos=3 .*BootstrapFewShot.*LabeledFewShot"):
        OPRO(metric=metric, num_candidates=7, init_temperature=0.5, max_bootstrapped_demos=3, max_labeled_demos=4)
    optimizer = OPRO(metric, prompt_model=ScriptedOptimizer().lm(), task_model=task_lm())
    with pytest.raises(ValueError, match="max_labeled_demos=4"):
        optimizer.compile(dspy.Predict("question -> answer"), trainset=make_trainset(4), max_labeled_demos=4)
    with pytest.raises(ValueError, match="teacher"):
        optimizer.compile(dspy.Predict("question -> answer"), trainset=make_trainset(4), teacher=dspy.Predict("q -> a"))


def test_requires_permission_to_run_shows_the_plan_and_asks(monkeypatch):
    asked, optimizer = [], ScriptedOptimizer()
    monkeypatch.setattr("builtins.input", lambda text: asked.append(text) or "n")
    opro = OPRO(metric, prompt_model=optimizer.lm(), task_model=task_lm(), num_steps=2, candidates_per_step=3)
    with pytest.raises(RunDeclinedError, match="nothing was spent"):
        opro.compile(dspy.Predict("question -> answer"), trainset=make_trainset(5), requires_permission_to_run=True)
    assert optimizer.prompts == [] and len(asked) == 1
    assert "at most 35 metric calls" in asked[0] and "at most 6 prompt-model calls" in asked[0]

    monkeypatch.setattr("builtins.input", lambda text: "y")
    program = opro.compile(
        dspy.Predict("question -> answer"), trainset=make_trainset(5), requires_permission_to_run=True
    )
    assert len(program.trial_logs) == 3


# ------------------------------------------------------------------------------------------- GEPA
def metric_with_feedback(gold, pred, trace=None, pred_name=None, pred_trace=None):
    correct = str(pred.answer).strip() == gold.answer
    return dspy.Prediction(score=float(correct), feedback="Correct." if correct else f"Expected {gold.answer}.")


def test_gepa_tutorial_call_site_with_a_feedback_metric():
    GEPA = OPRO_AS["GEPA"]
    student, train_set, val_set = dspy.Predict("question -> answer"), make_trainset(8), make_trainset(4, offset=40)
    with dspy.context(lm=task_lm()):
        optimizer = GEPA(
            metric=metric_with_feedback,
            auto="light",
            num_threads=4,
            track_stats=True,
            reflection_minibatch_size=3,
            reflection_lm=ScriptedOptimizer().lm(),
        )
        optimized_program = optimizer.compile(student, trainset=train_set, valset=val_set)
    assert optimized_program.score > start_score(student, val_set)
    assert optimizer.get_params()["num_exemplars"] == 3
    assert optimized_program.call_counts["metric_calls"] <= compat.AUTO_PRESETS["light"].budget(8, 4)


def test_gepa_metric_without_defaults_and_max_full_evals_budget():
    calls = []

    def strict_metric(gold, pred, trace, pred_name, pred_trace):
        calls.append((trace, pred_name, pred_trace))
        return metric_with_feedback(gold, pred)

    train, val = make_trainset(6), make_trainset(3, offset=40)
    program = OPRO(
        metric=strict_metric, max_full_evals=3, seed=None, reflection_lm=ScriptedOptimizer().lm(), task_model=task_lm()
    ).compile(dspy.Predict("question -> answer"), trainset=train, valset=val)
    assert program.call_counts["metric_calls"] <= 3 * (len(train) + len(val))
    assert calls and set(calls) == {(None, None, None)}  # a score of the whole program, as GEPA asks for one


def test_gepa_budget_forms_are_exclusive_like_gepa_s():
    with pytest.raises(ValueError, match="auto='light' and max_metric_calls=100"):
        OPRO(metric, auto="light", max_metric_calls=100)
    with pytest.raises(ValueError, match="auto='light' sets num_steps=10"):
        OPRO(metric, auto="light", depth=3)
    with pytest.raises(ValueError, match="use_mlflow .*mlflow.dspy.autolog"):
        OPRO(metric, use_mlflow=True)
    with pytest.raises(ValueError, match="num_trials=5 and auto='light' both set the budget"):
        OPRO(metric, auto="light", prompt_model=ScriptedOptimizer().lm(), task_model=task_lm()).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(4), num_trials=5
        )


# ---------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"breadth": 4, "candidates_per_step": 8}, ValueError, "candidates_per_step=8 and breadth=4 both set"),
        ({"breadth": 4, "num_candidates": 6}, ValueError, "breadth=4 and num_candidates=6 both set"),
        ({"candidates_per_stepp": 3}, TypeError, "unexpected argument 'candidates_per_stepp'.*candidates_per_step"),
        ({"minibatch_size": 25}, TypeError, "OPRO\\(\\.\\.\\.\\) got an unexpected argument 'minibatch_size'"),
        ({"teacher_settings": {"lm": "x"}}, ValueError, "OPRO has no teacher"),
        ({"metric_threshold": 0.5}, ValueError, "metric_threshold=0.5"),
        ({"candidate_selection_strategy": "pareto"}, ValueError, "GEPA's reflective search"),
        ({"component_selector": "all"}, ValueError, "Accepted: component_selector='round_robin'"),
        ({"auto": "extreme"}, ValueError, "auto must be one of"),
    ],
)
def test_foreign_arguments_are_mapped_or_refused_never_swallowed(kwargs, error, match):
    with pytest.raises(error, match=match):
        OPRO(metric, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"minibatch_size": 25}, ValueError, "sizes its screening minibatches itself"),
        ({"data_aware_proposer": False}, ValueError, "num_exemplars"),
        ({"eval_kwargs": {"failure_score": 0.5}}, ValueError, "max_errors"),
        ({"eval_kwargs": {"num_thread": 2}}, TypeError, "num_threads"),
        ({"eval_kwargs": {"num_threads": 0}}, ValueError, "num_threads must be at least 1"),
        ({"unknown_option": 1}, TypeError, "OPRO.compile"),
    ],
)
def test_compile_arguments_are_honoured_or_refused(kwargs, error, match):
    optimizer = ScriptedOptimizer()
    opro = OPRO(metric, prompt_model=optimizer.lm(), task_model=task_lm())
    with pytest.raises(error, match=match):
        opro.compile(dspy.Predict("question -> answer"), trainset=make_trainset(4), **kwargs)
    assert optimizer.prompts == []


def test_copro_positional_order_is_caught():
    with pytest.raises(TypeError, match="COPRO takes \\(prompt_model, metric\\)"):
        OPRO(task_lm(), metric)


def test_harmless_arguments_say_they_have_no_effect(caplog):
    with caplog.at_level(logging.WARNING, logger="dspy_opro"):
        OPRO(metric, prompt_model=ScriptedOptimizer().lm(), task_model=task_lm(), num_steps=0).compile(
            dspy.Predict("question -> answer"), trainset=make_trainset(3), minibatch_full_eval_steps=10
        )
    assert "minibatch_full_eval_steps=10 has no effect in OPRO" in caplog.text


def test_every_table_entry_is_in_the_readme():

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| DSPy argument |") :]
    table = table[: table.index("\n\n")]
    names = {entry.name for entry in (*compat.ALIASES, *compat.NEUTRAL, *compat.NO_EFFECT, *compat.REFUSED)}
    missing = sorted(name for name in names if f"`{name}`" not in table)
    assert not missing, f"README table lacks {missing}"
    for level, preset in compat.AUTO_PRESETS.items():
        row = (
            f"| `{level}` | {preset.candidates_per_step} | {preset.num_steps} | {preset.num_final_candidates} | "
            f"{preset.train_evals} x len(trainset) + {preset.val_evals} x len(valset) |"
        )
        assert row in readme


# ------------------------------------------------------------------------------------- get_params
def test_get_params_rebuilds_the_same_optimizer_with_its_lm_objects():
    prompt_lm = dspy.LM("openai/some-model", api_base="http://127.0.0.1:9/v1", temperature=0.3, max_tokens=77)
    optimizer = OPRO(
        metric, reflection_lm=prompt_lm, task_model="openai/gpt-4o-mini", auto="light", breadth=4, seed=None
    )
    params = optimizer.get_params()
    assert params["prompt_model"] is prompt_lm and params["task_model"] is optimizer.task_model
    rebuilt = OPRO(**params)
    assert rebuilt.get_params() == params
    assert rebuilt.prompt_model.kwargs["api_base"] == "http://127.0.0.1:9/v1"
    assert (rebuilt.prompt_model.kwargs["temperature"], rebuilt.prompt_model.kwargs["max_tokens"]) == (0.3, 77)
    assert isinstance(params["seed"], int)  # seed=None drew one, which the rebuild repeats
    assert params["candidates_per_step"] == 4 and not {"breadth", "reflection_lm"} & set(params)


# -------------------------------------------------------------------------------------- callbacks
class EvaluationRecorder(BaseCallback):
    def __init__(self):
        self.events = []

    def on_compile_start(self, call_id, instance, inputs):
        self.events.append(("compile_start", call_id, None))

    def on_compile_end(self, call_id, outputs, exception=None):
        self.events.append(("compile_end", call_id, exception))

    def on_evaluate_start(self, call_id, instance, inputs):
        self.events.append(("evaluate_start", call_id, (ACTIVE_CALL_ID.get(), instance, inputs)))

    def on_evaluate_end(self, call_id, outputs, exception=None):
        self.events.append(("evaluate_end", call_id, outputs))


def test_every_scoring_pass_fires_evaluate_callbacks_under_compile():
    recorder = EvaluationRecorder()
    train, val = make_trainset(8), make_trainset(4, offset=40)
    with dspy.context(callbacks=[recorder]):
        program = OPRO(
            metric, prompt_model=ScriptedOptimizer().lm(), task_model=task_lm(), num_steps=2, candidates_per_step=4
        ).compile(dspy.Predict("question -> answer"), trainset=train, valset=val)

    kinds = [kind for kind, _, _ in recorder.events]
    assert kinds[0] == "compile_start" and kinds[-1] == "compile_end"
    compile_id = recorder.events[0][1]
    inner = recorder.events[1:-1]
    assert inner and [k for k, _, _ in inner] == ["evaluate_start", "evaluate_end"] * (len(inner) // 2)
    starts, ends = inner[0::2], inner[1::2]
    assert all(s[1] == e[1] for s, e in zip(starts, ends, strict=True))  # each start is closed before the next
    assert all(parent == compile_id for _, _, (parent, _, _) in starts)
    assert all(isinstance(instance, dspy.Evaluate) for _, _, (_, instance, _) in starts)

    train_passes = [s for s in starts if s[2][2]["callback_metadata"]["metric_key"] != "eval_valset"]
    val_passes = [s for s in starts if s[2][2]["callback_metadata"]["metric_key"] == "eval_valset"]
    assert len(train_passes) == len(program.candidate_programs)
    assert len(val_passes) == sum(c["val_score"] is not None for c in program.candidate_programs)
    scores = sorted(c["score"] for c in program.candidate_programs)
    train_results = [e[2] for s, e in zip(starts, ends, strict=True) if s in train_passes]
    assert all(isinstance(r, EvaluationResult) for r in train_results)
    assert sorted(r.score for r in train_results) == scores
    first_program = train_passes[0][2][2]["program"]
    assert (
        first_program.predictors()[0].signature.instructions
        == dspy.Predict("question -> answer").signature.instructions
    )


# --------------------------------------------------------------------------- DSPy's DummyLM as LMs
def test_dummy_lms_drive_a_run_and_their_scripted_answers_are_not_spent_on_checks():
    # The prompt model answers in DSPy's own field layout, as DummyLM does; the set-up check skips DummyLMs.
    proposals = ["Answer with the number only.", "## output ##", "Reply with a number."]
    prompt_lm = DummyLM([{"proposed_instruction": text} for text in proposals])
    answers = {e.question: {"answer": e.answer} for e in make_trainset(4)}
    program = OPRO(
        metric, prompt_model=prompt_lm, task_model=DummyLM(answers), num_steps=1, candidates_per_step=3
    ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(4))
    instructions = {c["instruction"] for c in program.candidate_programs}
    assert {"Answer with the number only.", "Reply with a number."} <= instructions
    assert not any("##" in text for text in instructions)
    assert program.call_counts["rejected"] == {"markup": 1} and program.call_counts["unparsed"] == 0
    assert program.call_counts["preflight"]["calls"] == 0 and len(program.call_counts["preflight"]["skipped"]) == 2


# ------------------------------------------------------------------------------ meta_prompt="auto"
def test_auto_meta_prompt_is_one_rule_for_instruction_and_numeric_opro(tmp_path, monkeypatch):
    from dspy_opro.local import register_generator, unregister_generator

    monkeypatch.setattr(dspy, "cache", dspy.clients.cache.Cache(True, True, str(tmp_path), 10**7, 10**4))
    from dspy_opro.numeric import LinearRegression, optimize

    seen = []

    def generator(request):
        seen.append(request)
        return "15, 14"

    register_generator("tiny-test-optimizer", generator)
    try:
        numeric = optimize(
            LinearRegression(seed=1),
            prompt_model="local/tiny-test-optimizer",
            num_steps=1,
            candidates_per_step=2,
            show_progress=False,
        )
        assert numeric.steps and numeric.best_solution == (15, 14)
        assert seen and all(r.messages is None for r in seen)  # plain text completions ...
        assert all(r.prompt.endswith("\n[") and "]" in r.stop for r in seen)  # ... of the "base" style

        opro = OPRO(metric, prompt_model="local/tiny-test-optimizer", task_model=task_lm())
        assert opro.prompt_model.model_type == "text" and opro.meta_prompt == "auto"
        assert opro._for_run({}, make_trainset(3), None).meta_prompt == "base"
        remote = OPRO(metric, prompt_model=ScriptedOptimizer().lm())
        assert remote._for_run({}, make_trainset(3), None).meta_prompt == "chat"
    finally:
        unregister_generator("tiny-test-optimizer")


def test_verbose_logs_the_meta_prompts_for_the_call_only(caplog):
    package = logging.getLogger("dspy_opro")
    previous = package.level
    package.setLevel(logging.WARNING)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        for verbose in (False, True):
            caplog.clear()
            OPRO(
                metric, prompt_model=ScriptedOptimizer().lm(), task_model=task_lm(), num_steps=1, verbose=verbose
            ).compile(dspy.Predict("question -> answer"), trainset=make_trainset(3))
            assert ("Meta-prompt at step 1" in caplog.text) is verbose
            assert package.level == logging.WARNING
    finally:
        package.setLevel(previous)
