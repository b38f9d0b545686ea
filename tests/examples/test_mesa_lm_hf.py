"""The Hugging Face example (packed Trainer run, generate, save/load), end to end on tiny settings."""

import math

import pytest
from example_scripts import loaded_example

pytest.importorskip("transformers")


def test_main_trains_on_packed_documents_generates_and_reloads(tmp_path):
    argv = "--steps 4 --docs-per-step 3 --max-doc-bytes 96 --d-model 32 --layers 2 --heads 2 --warmup 1"
    argv += f" --sample-tokens 12 --out {tmp_path}"
    with loaded_example("mesa_lm_hf") as module:
        report = module.main(argv.split())
    assert math.isfinite(report.train_loss) and math.isfinite(report.eval_loss)
    assert report.eval_loss < math.log(256)  # a few steps already learn the byte frequencies
    assert report.train_tokens_per_s > 0
    assert report.greedy_matches_forward
    assert report.reloaded_max_diff == 0.0
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert report.sample
