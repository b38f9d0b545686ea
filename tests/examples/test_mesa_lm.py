"""The mesa language-model example, end to end on tiny settings."""

import math

import pytest
from example_scripts import loaded_example


@pytest.fixture(scope="module")
def mesa_lm():
    with loaded_example("mesa_lm") as module:
        yield module


def test_split_is_by_position_and_covers_the_corpus(mesa_lm):
    data = mesa_lm.load_corpus()
    splits = mesa_lm.split_by_position(data, 0.1)
    assert len(data) > 100_000
    assert len(splits.train) + len(splits.val) == len(data)
    assert bytes(splits.val[:100].tolist()) == data[len(splits.train) : len(splits.train) + 100]


def test_default_stacks_have_equal_parameter_counts(mesa_lm):
    settings = mesa_lm.Settings()
    configs = mesa_lm.matched_configs(settings)
    counts = {stack: mesa_lm.count_parameters(config) for stack, config in configs.items()}
    assert set(counts) == {"softmax", "mesa", "hybrid"}
    assert max(counts.values()) - min(counts.values()) <= 0.005 * max(counts.values())
    assert configs["mesa"].attention == ("mesa",) * settings.layers
    assert configs["softmax"].attention == ("softmax",) * settings.layers
    assert set(configs["hybrid"].attention) == {"mesa", "softmax"}
    assert mesa_lm.mlp_hidden(configs["mesa"]) == 4 * settings.d_model


def test_main_trains_every_stack_and_decodes_like_the_forward_pass(mesa_lm, tmp_path):
    out = tmp_path / "mesa_lm.png"
    argv = "--steps 8 --batch-size 4 --seq-len 32 --d-model 32 --layers 2 --heads 2 --warmup 2 --eval-interval 4"
    argv += f" --eval-windows 4 --sample-tokens 16 --out {out}"
    report = mesa_lm.main(argv.split())

    results = report.results
    assert set(results) == {"softmax", "mesa", "hybrid"}
    params = [result.params for result in results.values()]
    assert max(params) - min(params) <= 0.02 * max(params)
    for stack, result in results.items():
        losses = result.val_losses
        assert result.eval_steps == [0, 4, 8]
        assert all(math.isfinite(loss) for loss in losses), stack
        # Starts near ln 256 (uniform over bytes); even a few steps learn the byte frequencies.
        assert abs(losses[0] - math.log(256)) < 0.5, stack
        assert all(loss < losses[0] for loss in losses[1:]), stack
        assert losses[-1] < losses[0] - 0.1, stack
        assert result.train_tokens_per_s > 0
        decode_speed, max_diff = report.decode[stack]
        assert decode_speed > 0
        assert max_diff < 1e-4, stack
        assert report.samples[stack]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
