"""Tests of the in-context regression example: a hand-set mesa layer is ridge regression."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "in_context_regression.py"


@pytest.fixture(scope="module")
def icr():
    spec = importlib.util.spec_from_file_location("in_context_regression", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def tasks(icr, dtype=torch.float64, batch=64, n_context=30, d=10, noise_std=0.1):
    return icr.sample_tasks(batch, n_context, d, noise_std, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("mu", [1e-3, 0.1, 2.0])
def test_hand_set_mesa_layer_equals_ridge_regression(icr, mu):
    batch = tasks(icr)
    with torch.no_grad():
        mesa = icr.hand_set_mesa_regressor(10, mu)(batch)
    ridge = icr.ridge_predictions(batch, mu)
    assert mesa.shape == ridge.shape == (64, 30)
    torch.testing.assert_close(mesa, ridge, rtol=1e-10, atol=1e-10)


def test_hand_set_mesa_layer_in_float32_is_ridge_to_float32_precision(icr):
    batch = tasks(icr, torch.float32)
    with torch.no_grad():
        mesa = icr.hand_set_mesa_regressor(10, 0.1, dtype=torch.float32)(batch)
    # Ridge in float64 on the same (float32) data: what is left is the float32 arithmetic of the layer, on targets
    # up to ~4 and systems whose condition number reaches a few hundred near n = d.
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    batch64 = icr.Tasks(**{name: t.double() if t.is_floating_point() else t for name, t in fields.items()})
    torch.testing.assert_close(mesa.double(), icr.ridge_predictions(batch64, 0.1), rtol=1e-3, atol=1e-3)


def test_a_query_that_writes_is_not_ridge(icr):
    """The pitfall the write mask avoids: with the query in its own statistics the prediction shrinks."""
    batch = tasks(icr)
    model = icr.hand_set_mesa_regressor(10, 0.1)
    with torch.no_grad():
        inclusive = model.layer(batch.tokens)[:, ~batch.is_context, -1]
    ridge = icr.ridge_predictions(batch, 0.1)
    assert (inclusive - ridge).abs().max() > 1e-2
    assert inclusive.abs().mean() < ridge.abs().mean()


def test_one_gradient_step_baseline_is_worse_than_ridge(icr):
    batch = tasks(icr, batch=2048)
    learning_rate = icr.best_gradient_step_learning_rate(batch)
    gd = icr.loss_per_n(icr.gradient_step_predictions(batch, learning_rate), batch.y_query)
    ridge = icr.loss_per_n(icr.ridge_predictions(batch, 0.1), batch.y_query)
    assert (gd[19:] > 2 * ridge[19:]).all()


def test_script_runs_end_to_end(icr, tmp_path, capsys):
    out = tmp_path / "plot.png"
    icr.main(
        ["--n-max", "4", "--steps", "3", "--attention-steps", "3", "--batch", "8", "--eval-batch", "32"]
        + ["--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert "mesa, trained" in printed and "hand-set mesa vs ridge" in printed
    assert out.stat().st_size > 0
