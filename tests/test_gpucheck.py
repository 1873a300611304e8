r"""`python -m sophia.gpucheck` on the CPU: its arguments, the exit without CUDA, the
check list, checks that fail, crash, skip or run over budget, the reports, and the
checks that can run on the CPU run there.

The command itself needs a GPU; here `_find_device` is replaced to hand it the CPU,
and `CHECKS` by fakes, so that everything around the checks runs.
"""

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from sophia.experiments import cuda_checks, gpucheck
from sophia.experiments.cuda_checks import CheckFailed, CheckSkipped, Context
from sophia.experiments.gpucheck import Check

pytestmark = pytest.mark.usefixtures("one_thread")


def context(tmp_path, **changes) -> Context:
    fields = dict(out=tmp_path, device=torch.device("cpu"), repo=None)
    return Context(**{**fields, **changes})


# ## Fake checks


def ok(ctx):
    return {"ms": 1.5, "note": "a | b"}


def fails(ctx):
    raise CheckFailed("over the tolerance: fused", {"fused vs reference": 0.25})


def crashes(ctx):
    return 1 / 0


def skips(ctx):
    raise CheckSkipped("no tests/ beside the package")


def exits(ctx):
    raise SystemExit(2)


FAKES = [
    Check("ok", ok, 5, "returns figures"),
    Check("fails", fails, 5, "fails"),
    Check("crashes", crashes, 5, "divides by zero"),
    Check("skips", skips, 5, "cannot run here"),
    Check("exits", exits, 5, "calls sys.exit"),
    Check("ok_again", ok, 5, "runs after the others"),
]


@pytest.fixture
def on_cpu(monkeypatch):
    r"""The command as on a GPU machine, with the CPU as its device and `calls`
    recording which fake checks ran."""
    calls = []
    monkeypatch.setattr(gpucheck, "_find_device", lambda: torch.device("cpu"))

    def recording(check):
        def run(ctx):
            calls.append(check.name)
            return check.run(ctx)

        return Check(check.name, run, check.budget_s, check.what)

    monkeypatch.setattr(gpucheck, "CHECKS", [recording(c) for c in FAKES])
    return calls


# ## The check list


def test_the_check_list_names_every_check_in_order():
    assert [c.name for c in gpucheck.CHECKS] == [
        "build",
        "pytest",
        "quadratics",
        "gpt",
        "graph",
        "grad_scaler",
        "no_sync",
        "benchmark",
        "notebooks",
    ]
    assert all(c.what and c.budget_s > 0 for c in gpucheck.CHECKS)


def test_the_budgets_fit_in_eight_minutes():
    assert sum(c.budget_s for c in gpucheck.CHECKS) <= 8 * 60


# ## Without CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("args", [[], ["--out", "report"]], ids=["default", "out"])
def test_without_cuda_one_line_and_exit_2(tmp_path, args):
    result = subprocess.run(
        [sys.executable, "-m", "sophia.gpucheck", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is created without CUDA"


def test_import_sophia_does_not_load_the_command():
    code = "import sys, sophia; print([m for m in sys.modules if 'gpucheck' in m])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ## Arguments


def test_help_names_out(capsys):
    with pytest.raises(SystemExit) as exit:
        gpucheck.main(["--help"])
    assert exit.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["empty", "blank", "under a file", "a file"])
def test_an_unwritable_out_is_refused_before_any_check(tmp_path, on_cpu, capsys, kind):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    out = {
        "empty": "",
        "blank": "  ",
        "under a file": str(a_file / "report"),
        "a file": str(a_file),
    }[kind]
    with pytest.raises(SystemExit) as exit:
        gpucheck.main(["--out", out])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "argument --out" in lines[0] and repr(out) in lines[0], lines
    assert on_cpu == [], "no check ran"
    assert a_file.read_text() == "kept"


def test_unknown_arguments_are_refused(on_cpu, capsys):
    with pytest.raises(SystemExit) as exit:
        gpucheck.main(["--outt", "x"])
    assert exit.value.code == 2
    assert on_cpu == []


# ## Running the checks


def test_every_check_runs_whatever_the_others_did(tmp_path, on_cpu, capsys):
    out = tmp_path / "new" / "report"
    assert gpucheck.main(["--out", str(out)]) == 1
    assert on_cpu == [c.name for c in FAKES]
    report = json.loads((out / "report.json").read_text())
    status = {r["name"]: r["status"] for r in report["checks"]}
    assert status == {
        "ok": "passed",
        "fails": "failed",
        "crashes": "error",
        "skips": "skipped",
        "exits": "error",
        "ok_again": "passed",
    }
    records = {r["name"]: r for r in report["checks"]}
    assert records["fails"]["figures"] == {"fused vs reference": 0.25}
    assert "ZeroDivisionError" in records["crashes"]["message"]
    trace = (out / "crashes.traceback.txt").read_text()
    assert "1 / 0" in trace
    assert report["passed"] is False
    assert "FAILED" in capsys.readouterr().out


def test_exit_0_when_every_check_passed(tmp_path, monkeypatch, on_cpu):
    monkeypatch.setattr(gpucheck, "CHECKS", [FAKES[0], FAKES[-1]])
    assert gpucheck.main(["--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True


def test_a_skipped_check_is_not_a_pass():
    records = [{"status": "passed"}, {"status": "skipped"}]
    assert not gpucheck.passed(records)
    assert not gpucheck.passed([])
    assert gpucheck.passed(records[:1])


def test_a_check_over_its_budget_is_stopped(tmp_path):
    def sleeps(ctx):
        for _ in range(200):
            time.sleep(0.05)
        return {"finished": True}

    record = gpucheck.run_check(Check("slow", sleeps, 0.2, "sleeps"), context(tmp_path))
    assert record["status"] == "timeout"
    assert "budget of 0.2 s" in record["message"]
    assert record["figures"] == {}


# ## The reports


def test_report_md_and_json_from_records(tmp_path):
    records = [gpucheck.run_check(c, context(tmp_path)) for c in FAKES]
    env = gpucheck.environment(torch.device("cpu"))
    gpucheck.write_report(tmp_path, env, records, 12.0)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert [r["name"] for r in report["checks"]] == [c.name for c in FAKES]
    for r in report["checks"]:
        assert {"status", "seconds", "budget_s", "figures", "message"} <= r.keys()
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# python -m sophia.gpucheck")
    assert "**FAILED**: 2 of 6 checks passed" in md
    assert "| fails | failed |" in md and "| skips | skipped |" in md
    assert "| fused vs reference | 0.25 |" in md
    # A `|` in a figure is escaped, so the table keeps its columns.
    assert "| note | a \\| b |" in md
    assert "> over the tolerance: fused" in md


# ## The real checks, where the CPU can run them


def test_agreement_checks_run_on_the_cpu(tmp_path):
    from sophia.fused import fused_available

    if not fused_available("cpu"):
        pytest.skip("the CPU build of the fused kernel is unavailable")
    ctx = context(tmp_path)
    figures = cuda_checks.agreement_gpt(ctx)
    assert figures["fused vs reference"] <= figures["tolerance"]
    figures = cuda_checks.grad_scaler_skip(ctx)
    assert figures["fused: unchanged"] is True


def test_max_relative_difference_is_the_rtol_assert_close_needs():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    b = [torch.tensor([1.1, 0.0]), torch.tensor([2.0])]
    d = cuda_checks.max_relative_difference(a, b)
    torch.testing.assert_close(b, a, rtol=d * 1.001, atol=d * 1.001e-2)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(b, a, rtol=d * 0.99, atol=d * 0.99e-2)


# On a CPU the targets are usually missed: the check fails, with its figures.
def test_the_benchmark_check_reports_its_figures(tmp_path):
    from sophia.fused import fused_available

    if not fused_available("cpu"):
        pytest.skip("the CPU build of the fused kernel is unavailable")
    ctx = context(tmp_path, bench_params=20_000, bench_tensors=10)
    try:
        figures = cuda_checks.benchmark(ctx)
    except CheckFailed as failure:
        figures = failure.figures
    for key in ("SophiaG(fused=True) of copy", "fused / AdamW foreach", "copy GB/s"):
        assert key in figures, key
        assert f"unchecked: {key}" in figures, key
    for stem, nonfinite in (
        ("benchmark", "raise"),
        ("benchmark-unchecked", "unchecked"),
    ):
        table = (tmp_path / f"{stem}.txt").read_text()
        assert table.startswith("sophia.benchmark")
        assert f"nonfinite='{nonfinite}'" in table
        assert json.loads((tmp_path / f"{stem}.json").read_text())["params"] == 20_000


# A checkout of two tests, one marked `cuda`: the check runs only that one, and
# reads the counts from the JUnit file; a failing test fails the check.
@pytest.mark.parametrize("outcome", ["pass", "fail"])
def test_pytest_check_runs_the_cuda_tests_of_a_checkout(tmp_path, outcome):
    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "tests").mkdir(parents=True)
    out.mkdir()
    (repo / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nmarkers = ["cuda: needs CUDA"]\n'
    )
    body = "pass" if outcome == "pass" else "assert False, 'kernel differs'"
    (repo / "tests" / "test_fused_cuda.py").write_text(
        f"import pytest\n\n@pytest.mark.cuda\ndef test_gpu():\n    {body}\n\n"
        "def test_cpu():\n    pass\n"
    )
    ctx = context(out, repo=repo)
    if outcome == "pass":
        figures = cuda_checks.pytest_cuda(ctx)
        assert figures["tests"] == 1 and figures["failures"] == 0
    else:
        with pytest.raises(CheckFailed, match="exit 1") as failure:
            cuda_checks.pytest_cuda(ctx)
        assert failure.value.figures["failures"] == 1
    assert (out / "pytest-cuda.log").is_file()


@pytest.mark.parametrize(
    "check", [cuda_checks.pytest_cuda, cuda_checks.notebooks], ids=lambda f: f.__name__
)
def test_without_a_checkout_tests_and_notebooks_are_skipped(tmp_path, check):
    with pytest.raises(CheckSkipped, match="beside the package"):
        check(context(tmp_path, repo=tmp_path))


@pytest.mark.parametrize(
    "check",
    [cuda_checks.graph_capture, cuda_checks.no_host_sync],
    ids=lambda f: f.__name__,
)
def test_cuda_only_checks_skip_on_the_cpu(tmp_path, check):
    with pytest.raises(CheckSkipped, match="needs a CUDA device"):
        check(context(tmp_path))


def test_a_nan_difference_is_never_lost():
    a = [torch.ones(2), torch.ones(2)]
    b = [torch.tensor([float("nan"), 1.0]), torch.tensor([1.5, 1.0])]
    assert cuda_checks.max_relative_difference(a, b) == math.inf
    assert cuda_checks.max_relative_difference(a[::-1], b[::-1]) == math.inf
