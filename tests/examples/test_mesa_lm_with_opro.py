"""The mesa-LM + OPRO example: task grammar, serving through the local provider, and the whole run on tiny settings."""

import itertools
import random

import dspy
import pytest
import torch
from example_scripts import loaded_example

from dspy_opro.local import GenerationRequest, SmallModelAdapter, register, unregister_generator
from dspy_opro.testing import scripted_lm

TINY_MODEL = ["--train-steps", "3", "--batch-size", "4", "--d-model", "16", "--layers", "1"]


@pytest.fixture(scope="module")
def example():
    with loaded_example("mesa_lm_with_opro") as module:
        try:
            yield module
        finally:
            unregister_generator(module.MODEL_NAME)


@pytest.fixture(scope="module")
def tiny_model(example):
    torch.manual_seed(0)
    settings = example.TrainSettings(steps=2, batch_size=4, d_model=16, layers=1, heads=2)
    model, losses = example.train(settings, log_every=1)
    assert [step for step, _ in losses] == [1, 2]
    return model


def request(user, system=None, **overrides):
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}
    ]
    fields = {"messages": tuple(messages), "prompt": None, "temperature": 0.0, "max_tokens": 12, "stop": ()}
    return GenerationRequest(**{**fields, **overrides})


def test_grammar_names_each_operation_and_never_writes_the_unseen_phrasings(example):
    rng = random.Random(0)
    drawn = {op: {example.draw_instruction(op, rng) for _ in range(3000)} for op in example.OPERATIONS}
    for op, phrasings in drawn.items():
        assert example.CANONICAL[op] in phrasings, op
        assert example.UNSEEN[op] not in phrasings, op
    assert "" in drawn["copy"]  # no operation named: the list stays as it is
    assert "" not in drawn["sort"] and "" not in drawn["reverse"]
    assert example.BASELINE not in set().union(*drawn.values())


def test_batches_supervise_exactly_the_answer_bytes(example):
    inputs, targets = example.make_batch(random.Random(1), 8)
    assert inputs.shape == targets.shape
    for row in range(8):
        supervised = targets[row][targets[row] != -100].tolist()
        assert supervised[-1] == example.END
        answer = bytes(supervised[:-1]).decode("ascii")
        prompt = inputs[row].tolist()
        start = prompt.index(example.SEP) + 1
        items = list(bytes(prompt[start : prompt.index(example.ANS)]).decode("ascii"))
        assert prompt[0] == example.BOS
        assert answer in {"".join(apply(items)) for apply in example.OPERATIONS.values()}
        # The answer starts right after the answer marker: the target of the marker's position is its first byte.
        assert targets[row, prompt.index(example.ANS)] == supervised[0]


def test_requests_are_read_from_chat_or_raw_text(example):
    assert example.read_request(request("Items: 3 1 2", system="Sort  the\nlist.")) == (
        "Sort the list.",
        ["3", "1", "2"],
    )
    assert example.read_request(request("Items: 3, 1,2")) == ("", ["3", "1", "2"])
    raw = GenerationRequest(messages=None, prompt="Reverse it.\nItems: 9 8", temperature=0.0, max_tokens=4, stop=())
    assert example.read_request(raw) == ("Reverse it.", ["9", "8"])
    with pytest.raises(ValueError, match="needs a line 'Items: ...'"):
        example.read_request(request("3 1 2"))
    with pytest.raises(ValueError, match="single digits"):
        example.read_request(request("Items: 10 2"))


def test_metric_compares_items_in_order(example):
    gold = dspy.Example(items="3 1 2", result="1 2 3").with_inputs("items")
    assert example.result_metric(gold, dspy.Prediction(result="1 2 3")) == 1.0
    assert example.result_metric(gold, dspy.Prediction(result="1, 2,3")) == 1.0
    assert example.result_metric(gold, dspy.Prediction(result="3 2 1")) == 0.0
    assert example.result_metric(gold, dspy.Prediction(result="")) == 0.0


def test_served_model_answers_through_dspy_like_a_direct_decode(example, tiny_model):
    register()
    lm = example.serve(tiny_model)
    program = example.make_program("Sort the list.")
    with dspy.context(lm=lm, adapter=SmallModelAdapter()):
        prediction = program(items="4 2 7")
    direct = example.answer_items(tiny_model, "Sort the list.", ["4", "2", "7"])
    assert prediction.result == " ".join(direct).strip()
    assert lm.history[-1]["usage"]["prompt_tokens"] == len(example.encode_prompt("Sort the list.", "427"))

    # The generator alone: greedy answers repeat; max_tokens bounds the answer and is reported as the finish reason.
    server = example.ListModelServer(tiny_model)
    first, again = server(request("Items: 5 1 3", system="Copy.")), server(request("Items: 5 1 3", system="Copy."))
    assert first == again
    short = server(request("Items: 5 1 3", system="Copy.", max_tokens=1))
    assert short.completion_tokens <= 1
    assert short.finish_reason == ("length" if short.completion_tokens == 1 else "stop")


def test_checkpoint_round_trip(example, tiny_model, tmp_path):
    path = tmp_path / "model.pt"
    settings = example.TrainSettings(steps=2, batch_size=4, d_model=16, layers=1, heads=2)
    example.save_model(tiny_model, settings, path)
    loaded, loaded_settings = example.load_model(path)
    assert loaded_settings == settings
    tokens = torch.tensor([example.encode_prompt("Sort the list.", "3142")])
    assert torch.equal(loaded(tokens)[0], tiny_model(tokens)[0])
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):  # noqa: B017 - torch's own error for a file that is not a checkpoint
        example.load_model(tmp_path / "other.pt")


def test_main_runs_opro_on_the_served_model_and_writes_the_plot(example, tmp_path):
    proposals = itertools.cycle(["Sort the list.", "Arrange the digits in ascending order."])

    def propose(call):
        return f"<INS>{next(proposals)}</INS>"

    out, checkpoint = tmp_path / "opro.png", tmp_path / "lists.pt"
    common = [*TINY_MODEL, "--train-size", "4", "--val-size", "3", "--test-size", "5", "--threads", "2"]
    common += ["--out", str(out), "--model-path", str(checkpoint)]
    report = example.main([*common, "--steps", "1", "--candidates", "2"], prompt_lm=scripted_lm(propose))

    assert report.trained_here and checkpoint.is_file()
    assert [record["step"] for record in report.trajectory] == [0, 1]
    assert report.trajectory[1]["candidate_scores"]  # the scripted proposals were scored on the served model
    assert report.call_counts["task_lm"]["calls"] >= 4 * 3  # the start and two proposals on four lists
    assert report.optimized_instruction in {
        example.BASELINE,
        "Sort the list.",
        "Arrange the digits in ascending order.",
    }
    assert [row.source for row in report.rows][:3] == ["baseline (empty)", "baseline, OPRO start", "training phrasing"]
    assert report.rows[-1].source.startswith("OPRO")
    assert all(0.0 <= value <= 100.0 for row in report.rows for value in (row.train, row.val, row.test))
    assert set(report.selection) >= {example.CANONICAL["sort"], example.BASELINE, example.EMPTY_INSTRUCTION}
    assert "Process the list." in report.table and "canonical: sort" in report.selection_table
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun with the same checkpoint loads it instead of training.
    again = example.main([*common, "--steps", "0"], prompt_lm=scripted_lm(propose))
    assert not again.trained_here and again.losses == []
