r"""Tests of `python -m sophia.benchmark`: the results it returns, the table it prints, the inputs it refuses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sophia.experiments.benchmark import (
    BASELINE,
    FUSED_ADAMW,
    FUSED_SOPHIA,
    contenders,
    main,
    transformer_like_shapes,
)

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--params",
    "20000",
    "--tensors",
    "10",
    "--steps",
    "2",
    "--repeats",
    "2",
    "--warmup",
    "1",
]


# The shape generator promises exact counts: `n_tensors` tensors holding `n_params`
# elements, none of them empty, for every valid pair, including the fallback to plain
# vectors when the pair is too small for transformer layers.
@pytest.mark.parametrize(
    "n_params, n_tensors",
    [
        (1, 1),
        (7, 7),
        (10, 3),
        (50, 2),
        (100, 3),
        (1000, 14),
        (20_000, 10),
        (12_345, 100),
        (10_000_000, 100),
    ],
)
def test_shapes_are_exact(n_params, n_tensors):
    shapes = transformer_like_shapes(n_params, n_tensors)
    assert len(shapes) == n_tensors
    assert sum(math.prod(s) for s in shapes) == n_params
    assert all(math.prod(s) >= 1 for s in shapes)


def test_shapes_look_like_a_transformer():
    shapes = transformer_like_shapes(10_000_000, 100)
    assert len(shapes[0]) == 2
    assert sum(len(s) == 2 for s in shapes) > 20
    assert sum(len(s) == 1 for s in shapes) > 20


@pytest.mark.parametrize("n_params, n_tensors", [(5, 10), (10, 0), (0, 0)])
def test_shapes_refuse_impossible_counts(n_params, n_tensors):
    with pytest.raises(ValueError, match="n_tensors"):
        transformer_like_shapes(n_params, n_tensors)


def test_main_returns_every_contender(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = main([*TINY, "--json", str(out)])

    names = [name for name, _ in contenders()]
    assert list(results["results"]) == names
    assert set(names) | set(results["unavailable"]) >= {FUSED_SOPHIA, FUSED_ADAMW}
    assert results["copy_bandwidth_gbs"] > 0
    for r in results["results"].values():
        assert 0 < r["bandwidth_fraction"] and math.isfinite(r["bandwidth_gbs"])
    assert BASELINE in names
    for name in names:
        r = results["results"][name]
        for key in ("median_ms", "min_ms", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["min_ms"] <= r["median_ms"]
        assert len(r["samples_ms"]) == 2
    assert results["results"][BASELINE]["ratio"] == 1.0
    assert results["params"] == 20_000
    assert results["tensors"] == 10
    assert results["threads"] == torch.get_num_threads()
    assert results["torch"] == torch.__version__

    assert json.loads(out.read_text()) == results
    printed = capsys.readouterr().out
    assert "ms/step (median)" in printed
    assert all(name in printed for name in names)


def test_bfloat16_runs():
    results = main([*TINY, "--dtype", "bfloat16", "--repeats", "1"])
    assert results["dtype"] == "bfloat16"
    assert all(math.isfinite(r["median_ms"]) for r in results["results"].values())


# `--nonfinite` reaches the optimizers that are timed: with "unchecked" the step does not
# look for NaNs, so a NaN gradient passes through instead of being refused.
def test_nonfinite_rule_reaches_the_timed_optimizers(capsys):
    results = main([*TINY, "--repeats", "1", "--nonfinite", "unchecked"])
    assert results["nonfinite"] == "unchecked"
    assert "nonfinite='unchecked'" in capsys.readouterr().out
    for nonfinite, refused in (("raise", True), ("unchecked", False)):
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        step = dict(contenders(nonfinite=nonfinite))["SophiaG(foreach=False)"]([p])
        p.grad[1] = float("nan")
        if refused:
            with pytest.raises(FloatingPointError):
                step()
        else:
            step()
            assert torch.isnan(p).any()


def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sophia.benchmark", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_prints_the_table():
    proc = _run_module(*TINY)
    assert proc.returncode == 0, proc.stderr
    assert "implementation" in proc.stdout and "ms/step (median)" in proc.stdout
    for name, _ in contenders():
        assert name in proc.stdout
    assert "20,000 in 10 tensors" in proc.stdout


# Bad input ends with argparse's usage error: exit code 2 and a message naming the
# option. Checked in-process (fast) for each case, and once as a real command, for the
# exit code and the absence of a traceback.
BAD = [
    (["--tensors", "0"], "--tensors"),
    (["--params", "0"], "--params"),
    (["--params", "5", "--tensors", "10"], "--tensors"),
    (["--steps", "0"], "--steps"),
    (["--repeats", "-1"], "--repeats"),
    (["--warmup", "-1"], "--warmup"),
    (["--dtype", "float16"], "--dtype"),
    (["--device", "no-such-device"], "--device"),
    (["--json", "/no/such/folder/out.json"], "--json"),
]


@pytest.mark.parametrize("argv, option", BAD)
def test_bad_input_is_a_usage_error(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and option in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_bad_input_from_the_command_line():
    proc = _run_module("--params", "5", "--tensors", "10")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and "--tensors" in last
    assert proc.stdout == ""
