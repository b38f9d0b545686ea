"""The numeric OPRO examples end to end, on prompt models served as Python generators (no model file needed)."""

import contextlib
import sys

import pytest
from example_scripts import EXAMPLES, loaded_example

from dspy_opro.local import register_generator, unregister_generator


@pytest.fixture
def scripts():
    sys.path.insert(0, str(EXAMPLES))
    register_generator("example-pairs", lambda request: "15, 14]")
    register_generator("example-tours", lambda request: "0,2,4,1,3,5")
    try:
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(loaded_example(name)) for name in ("linear_regression", "tsp")}
    finally:
        unregister_generator("example-pairs")
        unregister_generator("example-tours")
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("_common", None)


def test_linear_regression_reaches_the_optimum_with_a_model_that_proposes_it(scripts, tmp_path, capsys):
    out = tmp_path / "lr.png"
    argv = ["--prompt-model", "local/example-pairs", "--runs", "2", "--steps", "3", "--threads", "1", "--out", str(out)]
    scripts["linear_regression"].main(argv)
    printed = capsys.readouterr().out
    assert "(base meta-prompt)" in printed and "local/example-pairs (this machine)" in printed
    reached = next(line for line in printed.splitlines() if line.startswith("local/example-pairs"))
    assert reached.split()[3] == "2/2"  # (15, 14) is the best integer pair of both runs
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tsp_reports_opro_beside_the_baselines(scripts, tmp_path, capsys):
    out = tmp_path / "tsp.png"
    argv = ["--prompt-model", "local/example-tours", "--n", "6", "--steps", "2", "--meta-prompt", "base"]
    scripts["tsp"].main([*argv, "--max-samples", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "exact optimum (Held-Karp DP)" in printed and "OPRO, local/example-tours" in printed
    assert "1 new valid tours" in printed  # the one tour it proposes, evaluated once, then duplicates
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
