r"""`python -m sophia`, the quick start's main job: it runs, and it would notice a disagreement."""

import subprocess
import sys

import pytest

import sophia.experiments.demo as demo


def test_demo_reports_agreement(capsys):
    assert demo.main(["--steps", "25"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "foreach", "fused", "authors' formula"):
        assert name in out
    assert "all implementations agree" in out


def test_demo_fails_when_an_implementation_drifts(monkeypatch, capsys):
    # A foreach step that forgets the weight decay must be caught by the table.
    real = demo.SophiaG

    def drifting(params, **hyper):
        if hyper.get("foreach"):
            hyper["weight_decay"] = 0.0
        return real(params, **hyper)

    monkeypatch.setattr(demo, "SophiaG", drifting)
    assert demo.main(["--steps", "25"]) == 1
    assert "DISAGREEMENT" in capsys.readouterr().out


def test_demo_loss_goes_down():
    problem = demo.Problem(steps=100)
    _, losses, opt = demo.train(
        problem, lambda ps: demo.SophiaG(ps, lr=0.05, rho=0.05, weight_decay=0.01)
    )
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert 0.0 <= opt.win_rate() <= 1.0


def test_demo_says_why_fused_did_not_run(monkeypatch, capsys):
    monkeypatch.setattr(demo, "_fused_unavailable", lambda: "no C++ compiler")
    assert demo.main(["--steps", "12"]) == 0
    assert "fused              not run: no C++ compiler" in capsys.readouterr().out


def test_module_entry_point_and_bad_arguments():
    ok = subprocess.run(
        [sys.executable, "-m", "sophia", "--steps", "12"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "sophia", "--steps", "0"], capture_output=True, text=True
    )
    assert (
        bad.returncode == 2 and "--steps must be in 1..1000000000, got 0" in bad.stderr
    )


# A number of steps or a seed that would overflow the batches' 64-bit seeds is a usage
# error (status 2, one line), not a traceback from inside the first batch.
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", str(10**20)], "--steps must be in 1..1000000000"),
        (["--seed", str(10**20)], "--seed must be in -2**31..2**31-1"),
    ],
)
def test_a_huge_steps_or_seed_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    assert "Traceback" not in err


def test_a_nan_counts_as_the_worst_disagreement():
    import torch

    assert demo.max_relative_difference(
        [torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, 2.0])]
    ) == float("inf")
