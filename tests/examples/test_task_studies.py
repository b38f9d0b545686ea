"""The GSM8K, BBH and optimizer-swap examples, end to end on tiny data with scripted models.

The scripted task model answers correctly only when its instruction contains "carefully"; the scripted prompt
model proposes such an instruction among others. So a working pipeline must end with OPRO's instruction scoring
100 on the test set while the paper's baselines score 0.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sys
import threading
from pathlib import Path

import pytest
from example_scripts import EXAMPLES, loaded_example

from dspy_opro import ModelSetup
from dspy_opro.local import SmallModelAdapter
from dspy_opro.testing import ScriptedCall, scripted_lm

KEYWORD = "carefully"
PROPOSALS = ["Think about it.", "Use 2 steps.", "Solve it carefully.", "Be brief."]
_SUM = re.compile(r"What is (\d+) plus (\d+)\?")
_GROUPS = re.compile(r"There are (\d+) \w+ with (\d+) ")
_BOOLEAN = re.compile(r"Question: (True|False) and (True|False) is")


@pytest.fixture(scope="module")
def scripts():
    """The three example scripts as modules (they import ``_common`` from their own folder)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        with contextlib.ExitStack() as stack:
            loaded = {name: stack.enter_context(loaded_example(name)) for name in ("gsm8k", "bbh", "swap_optimizer")}
            loaded["common"] = sys.modules["_common"]
            yield loaded
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("_common", None)


# ------------------------------------------------------------------ scripted models
def gold(user: str) -> str:
    """The right answer to a question of the tiny data sets below."""
    if match := _SUM.search(user):
        return str(int(match.group(1)) + int(match.group(2)))
    if match := _BOOLEAN.search(user):
        return str(match.group(1) == "True" and match.group(2) == "True")
    if match := _GROUPS.search(user):
        return str(int(match.group(1)) * int(match.group(2)))
    raise AssertionError(f"unexpected question: {user!r}")


def task_reply(call: ScriptedCall) -> str:
    """SmallModelAdapter layout: the instruction is the system message, the reply is the answer."""
    if "Quantities:" not in call.user and "Reply in this form" not in call.user and "There are" in call.user:
        return "the two numbers" if "list" in call.system.lower() else "nothing"  # the extract stage
    answer = gold(call.user) if KEYWORD in call.system.lower() else "I am not sure."
    if "Quantities:" in call.user and "nothing" in call.user:
        answer = "I am not sure."
    if "Reply in this form" in call.user:  # ChainOfThought: reasoning and answer fields
        return f"Reasoning: I read the question.\nAnswer: {answer}"
    return answer


class TaskModel:
    """`task_reply`, remembering every system message (instruction) it was sent."""

    def __init__(self):
        self.systems: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, call: ScriptedCall) -> str:
        with self._lock:
            self.systems.add(call.system)
        return task_reply(call)


class Proposer:
    """A prompt model cycling through `PROPOSALS`; counts its calls."""

    def __init__(self, copro_format: bool = False):
        self.copro_format = copro_format
        self.calls = 0
        self._cycle = itertools.cycle(PROPOSALS)
        self._lock = threading.Lock()

    def __call__(self, call: ScriptedCall) -> str:
        with self._lock:
            self.calls += 1
            proposal = next(self._cycle)
        if self.copro_format:  # COPRO's two output fields, as SmallModelAdapter asks for them
            return f"Proposed Instruction: {proposal}\nProposed Prefix For Output Field: Result:"
        return f"<INS>{proposal}</INS>"


@pytest.fixture
def models(scripts, monkeypatch):
    """Scripted models in place of the ones named by --task-model / --prompt-model."""
    common = scripts["common"]
    task, proposer, copro_proposer = TaskModel(), Proposer(), Proposer(copro_format=True)
    made = ModelSetup(
        task_lm=scripted_lm(task, model="scripted/task"),
        adapter=SmallModelAdapter(),
        prompt_lm=scripted_lm(proposer, model="scripted/prompt"),
        meta_prompt="chat",
        prompt_chat_lm=scripted_lm(copro_proposer, model="scripted/prompt-chat"),
    )
    monkeypatch.setattr(common, "setup_models", lambda *args, **kwargs: made)
    made.task, made.proposer, made.copro_proposer = task, proposer, copro_proposer
    return made


# ------------------------------------------------------------------ tiny release-format data
def write_gsm8k(folder: Path) -> Path:
    folder.mkdir()
    for split, offset, count in (("train", 1, 14), ("test", 50, 6)):
        with (folder / f"{split}.jsonl").open("w") as handle:
            for a in range(offset, offset + count):
                record = {"question": f"What is {a} plus 3?", "answer": f"{a} + 3 = {a + 3}\n#### {a + 3}"}
                handle.write(json.dumps(record) + "\n")
    return folder


def write_bbh(folder: Path, task: str = "boolean_expressions") -> Path:
    folder.mkdir()
    pairs = list(itertools.product(["True", "False"], repeat=2)) * 4
    examples = [{"input": f"{a} and {b} is", "target": str(a == "True" and b == "True")} for a, b in pairs]
    (folder / f"{task}.json").write_text(json.dumps({"canary": "test data", "examples": examples}))
    return folder


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_rows(study, baselines: list[str]) -> None:
    assert [row.instruction for row in study.rows[:-1]] == baselines
    assert study.rows[-1].source.startswith("OPRO")
    for row in study.rows:
        for value in (row.test, row.train, row.val):
            assert value is None or 0.0 <= value <= 100.0


# ------------------------------------------------------------------ GSM8K
@pytest.mark.parametrize("program", ["predict", "cot"])
def test_gsm8k_finds_the_instruction_that_beats_the_baselines(scripts, models, tmp_path, program):
    data = write_gsm8k(tmp_path / "gsm8k")
    out = tmp_path / "gsm8k.png"
    argv = f"--data-dir {data} --program {program} --train 6 --val 4 --test 6 --steps 2 --candidates 4 --out {out}"
    study = scripts["gsm8k"].main(argv.split())

    check_rows(study, ["Let's think step by step.", "Let's solve the problem.", " "])
    chosen = study.rows[-1]
    assert KEYWORD in chosen.instruction.lower()
    assert (chosen.train, chosen.val, chosen.test) == (100.0, 100.0, 100.0)
    assert all(row.test == 0.0 for row in study.rows[:-1])
    assert study.rows[1].train == 0.0  # OPRO's start was scored on the training set
    assert study.call_counts["rejected"].get("filtered", 0) >= 1  # "Use 2 steps." holds a digit
    assert [record["step"] for record in study.trajectory] == [0, 1, 2]
    assert is_png(out)


def test_gsm8k_log_dir_resumes_without_calling_the_prompt_model(scripts, models, tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k")
    argv = f"--data-dir {data} --program predict --train 6 --val 4 --test 6 --steps 2 --candidates 4"
    argv += f" --log-dir {tmp_path / 'log'} --out {tmp_path / 'gsm8k.png'}"
    first = scripts["gsm8k"].main(argv.split())
    calls = models.proposer.calls
    assert calls > 0 and (tmp_path / "log" / "opro_history.json").is_file()

    again = scripts["gsm8k"].main(argv.split())
    assert models.proposer.calls == calls
    assert again.rows[-1].instruction == first.rows[-1].instruction


def test_gsm8k_without_data_dir_offline_says_to_pass_data_dir(scripts, models, monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as exited:
        scripts["gsm8k"].main(["--out", str(tmp_path / "g.png")])
    message = str(exited.value)
    assert "openai/gsm8k" in message and "--data-dir" in message and "train.jsonl" in message
    assert not (tmp_path / "g.png").exists()


def test_gsm8k_asking_for_more_questions_than_exist_is_a_clear_error(scripts, models, tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k")
    with pytest.raises(SystemExit, match="only 14 exist"):
        scripts["gsm8k"].main(["--data-dir", str(data), "--train", "10", "--val", "10"])


# ------------------------------------------------------------------ BBH
def test_bbh_paper_split_by_fractions_without_validation(scripts, models, tmp_path, capsys):
    data = write_bbh(tmp_path / "bbh")
    out = tmp_path / "bbh.png"
    argv = f"--task boolean_expressions --data-dir {data} --program predict --train 0.5 --val 0 --test 0.5"
    study = scripts["bbh"].main([*argv.split(), "--steps", "2", "--candidates", "4", "--out", str(out)])

    check_rows(study, ["Let's think step by step.", " "])
    assert "boolean answers, 16 examples): 8 train / 0 val / 8 test" in capsys.readouterr().out
    chosen = study.rows[-1]
    assert KEYWORD in chosen.instruction.lower() and chosen.test == 100.0
    assert chosen.val is None  # no validation split: OPRO chose by training score
    assert study.rows[1].train == 0.0  # the empty instruction, OPRO's start
    # The empty instruction reaches the task model as no system message, never as DSPy's default sentence.
    assert "" in models.task.systems
    assert not any("Given the fields" in system for system in models.task.systems)
    assert is_png(out)


def test_bbh_starting_instructions_are_labelled_and_scored(scripts, models, tmp_path):
    data = write_bbh(tmp_path / "bbh")
    argv = ["--task", "boolean_expressions", "--data-dir", str(data), "--program", "predict", "--steps", "1"]
    argv += ["--train", "6", "--val", "4", "--test", "6", "--out", str(tmp_path / "bbh.png")]
    study = scripts["bbh"].main([*argv, "--initial", "Let's think step by step.", "Be exact."])

    sources = [(row.instruction, row.source) for row in study.rows[:-1]]
    assert sources == [
        ("Let's think step by step.", "baseline, OPRO start"),
        (" ", "baseline"),
        ("Be exact.", "OPRO start"),
    ]
    assert study.rows[0].train == 0.0 and study.rows[1].train is None and study.rows[2].train == 0.0


def test_bbh_offline_and_unknown_task_messages(scripts, models, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as exited:
        scripts["bbh"].main(["--task", "navigate"])
    assert "--data-dir" in str(exited.value) and "navigate.json" in str(exited.value)
    with pytest.raises(SystemExit):  # argparse: not a BBH task
        scripts["bbh"].main(["--task", "not_a_task"])


# ------------------------------------------------------------------ the swap
def test_swap_example_compiles_the_same_pipeline_with_both_optimizers(scripts, models, tmp_path, capsys):
    swap = scripts["swap_optimizer"]
    out = tmp_path / "swap.png"
    outcomes = swap.main(f"--train 4 --test 5 --breadth 2 --depth 1 --out {out}".split())

    student, copro, opro = outcomes
    assert [o.name for o in outcomes] == ["student", "COPRO", "OPRO"]
    names = [name for name, _ in student.program.named_predictors()]
    assert names == ["extract", "solve"]
    for outcome in (copro, opro):
        assert [name for name, _ in outcome.program.named_predictors()] == names
        assert not any(change.startswith(("predictors", "fields", "demos")) for change in outcome.changes)
        assert 0.0 <= outcome.test <= 100.0 and 0.0 <= outcome.train <= 100.0
        assert outcome.meter.metric_calls > 0 and outcome.meter.calls["task"] >= outcome.meter.metric_calls
        assert outcome.meter.calls["prompt"] > 0 and outcome.seconds >= 0
    assert opro.changes == ["instructions of solve"]  # OPRO changes instructions only, here the second stage's
    assert KEYWORD in opro.program.solve.signature.instructions.lower() and opro.test == 100.0
    assert student.test == 0.0
    assert opro.meter.metric_calls <= copro.meter.metric_calls + 4 + 1  # matched budget (+ initial, metric check)
    printed = capsys.readouterr().out
    assert "| test accuracy %" in printed and "| wall time s" in printed and "OPRO changed:" in printed
    assert "System message:" not in printed  # COPRO's dump of its prompt history is kept out of the report
    assert is_png(out)
