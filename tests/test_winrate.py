r"""The win-rate measurements: the same runs as the training loop's, and each part's
arithmetic."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_train_config

from sophia import SophiaG
from sophia.experiments import winrate
from sophia.experiments.data import load_corpus
from sophia.experiments.train import train


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib")


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah"])
def test_a_run_is_the_training_loops_run(corpus, optimizer, one_thread):
    # Evaluations in between change nothing, so the final loss and every win rate
    # agree bit for bit with `train`'s.
    config = tiny_train_config(
        optimizer=optimizer, steps=20, hess_interval=5, eval_interval=7
    )
    expected = train(config, corpus=corpus)
    got = winrate.run(config, corpus)
    assert got.win_rates == expected.win_rates
    assert got.final_val_loss == expected.final_val_loss


def test_fill_in_after_forty_refreshes():
    share = winrate.fill_in(0.99, 40)
    assert share["final"] == pytest.approx(1 - 0.99**40)
    assert share["final"] == pytest.approx(0.331, abs=1e-3)
    # The mean of 1 - 0.99^r over r = 1..40, in closed form.
    closed = 1 - 0.99 * (1 - 0.99**40) / (0.01 * 40)
    assert share["mean"] == pytest.approx(closed)
    assert share["mean"] == pytest.approx(0.180, abs=1e-3)


def test_a_corrected_rho_steps_as_a_corrected_h():
    # rho / (1 - beta2^r) with h steps exactly as rho with h / (1 - beta2^r) (to
    # rounding), and clips the same coordinates.
    torch.manual_seed(0)
    shape, r, beta2, rho = (1000,), 3, 0.99, 0.05
    grad, h = torch.randn(shape, dtype=torch.float64), torch.rand(shape).double()
    results, rates = [], []
    for rho_used, h_used in ((rho / (1 - beta2**r), h), (rho, h / (1 - beta2**r))):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        opt = SophiaG([p], lr=0.1, rho=rho_used, betas=(0.9, beta2), weight_decay=0)
        p.grad = grad.clone()
        opt.step(bs=100)
        opt.state[p]["hessian"].copy_(h_used)
        p.grad = grad.clone()
        opt.step(bs=100)
        results.append(p.detach().clone())
        rates.append(opt.win_rate())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=0)
    assert rates[0] == rates[1]


def test_the_bias_correction_sets_rho_per_refresh():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SophiaG([{"params": [p]}, {"params": [], "rho": 1.0}], rho=0.05)
    set_rho = winrate.bias_corrected(0.05, 0.99)
    set_rho(opt, 1)
    assert [g["rho"] for g in opt.param_groups] == [pytest.approx(5.0)] * 2
    set_rho(opt, 40)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.05 / (1 - 0.99**40))


def test_measure_writes_every_part(corpus, one_thread, monkeypatch):
    monkeypatch.setattr(winrate, "PROBES", 3)
    base = tiny_train_config(steps=10, hess_interval=5, lr=None)
    out = winrate.measure(base, corpus, log=lambda s: None)
    json.dumps(out)  # JSON-ready
    assert out["fill_in"]["refreshes"] == 2
    assert [b["batch_size"] for b in out["batch_sizes"]] == list(winrate.BATCH_SIZES)
    assert out["sophiag"]["batch_size"] == base.batch_size
    sophiah = dataclasses.replace(base, optimizer="sophiah")
    assert out["config"]["sophiah"]["rho"] == sophiah.hyper()["rho"]
    h = out["sophiah"]
    assert h["coordinates"] > 0
    assert 0 <= h["h_negative_share"] <= 1
    assert h["h_abs_sum"] >= abs(h["h_sum"])
    # GNB's estimate is a sum of squares: never negative.
    assert h["gnb_sum"] > 0
    assert math.isfinite(h["hutchinson_sum"])
    # The corrected run clips no more than the plain one.
    assert (
        out["sophiag_bias_corrected"]["win_rate_mean"]
        >= out["sophiag"]["win_rate_mean"]
    )


def test_an_out_file_in_a_missing_folder_is_refused(tmp_path, capsys):
    assert winrate.main(["--out", str(tmp_path / "no" / "x.json")]) == 2
    assert "no folder" in capsys.readouterr().err
