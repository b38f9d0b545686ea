"""Comparing the optimizer's instruction with baselines on held-out data: rows, table and plot."""

import dspy
from opro_scripted import ScriptedOptimizer, make_trainset, metric, task_lm

from dspy_opro import OPRO
from dspy_opro.study import Row, compare, describe, format_counts, format_table, plot_study


def make_program(instruction):
    return dspy.Predict(dspy.Signature("question -> answer").with_instructions(instruction))


def study(**kwargs):
    lm = task_lm()
    optimizer = OPRO(
        metric,
        prompt_model=ScriptedOptimizer().lm(),
        task_model=lm,
        num_steps=3,
        candidates_per_step=8,
        initial_instructions="Answer.",
        screening=False,
        show_progress=False,
    )
    lines = []
    result = compare(
        optimizer,
        make_program("Answer."),
        trainset=make_trainset(6),
        valset=make_trainset(4, offset=10),
        testset=make_trainset(6, offset=20),
        metric=metric,
        baselines=[("Answer.", "baseline, OPRO start"), ("Give the number only.", "baseline")],
        make_program=make_program,
        context=lambda: dspy.context(lm=lm),
        num_threads=2,
        echo=lines.append,
        **kwargs,
    )
    return result, lines


def test_the_rows_hold_the_baselines_then_the_optimizer_s_choice():
    result, lines = study()
    start, other, chosen = result.rows
    assert (start.source, other.source) == ("baseline, OPRO start", "baseline") and chosen.source.startswith("OPRO")
    assert start.train == 0.0 and start.val is not None  # OPRO scored its start on both splits
    assert other.train is None and other.val is None  # never scored by OPRO, and not scored again here
    assert chosen.test == 100.0 and start.test == 0.0 and len(lines) == 3 and lines[0].startswith("test set, ")
    assert [r["step"] for r in result.trajectory] == [0, 1, 2, 3] and result.call_counts["metric_calls"] > 0


def test_rescored_splits_agree_with_the_optimizer_s_own_scores():
    result, _ = study(rescore=("train", "val", "test"), chosen_label="OPRO")
    start, other, chosen = result.rows
    candidates = {c["instruction"]: c for c in result.optimized.candidate_programs}
    assert start.train == candidates["Answer."]["score"] and chosen.train == candidates[chosen.instruction]["score"]
    assert other.train is not None and chosen.source == "OPRO"


def test_the_table_lines_up_every_row_and_the_plot_is_written(tmp_path):
    rows = [Row("Let's think step by step.", "start", 10.0, 20.0, None), Row("", "OPRO", 50.0, 60.0, 55.0)]
    table = format_table(rows).splitlines()
    assert table[0].startswith("| which | train % |") and len({len(line) for line in table[:2]}) == 1
    assert table[2].startswith("| start |    20.0 |     – |   10.0 |") and "| OPRO  |" in table[3]
    assert describe("") == "(empty)" and describe("x" * 100, 20) == '"' + "x" * 15 + '..."'
    result, _ = study()
    assert format_counts(result.call_counts, 1.0).startswith(f"OPRO spent {result.call_counts['metric_calls']} metric")
    path = plot_study(result, tmp_path / "study.png", "a study")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.plot == path
