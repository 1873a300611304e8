r"""
---
title: python -m sophia.gpucheck
summary: One command that verifies the CUDA path on a first GPU and writes report.md and report.json.
---

The CUDA code of this package is compiled and its kernel source run on the CPU in every
test run, but the GPU path itself (the extension's CUDA build, graph capture, the
`GradScaler` path, the bandwidth) runs only where there is a GPU. This command runs all
of it in one go, in under eight minutes on one GPU:

```
python -m sophia.gpucheck --out gpucheck
```

It runs the [checks](cuda_checks.html) in the order of `CHECKS`, each under its own
time budget; a check that fails, crashes or runs past its budget is recorded and the
next one runs. Then it writes `report.md` (for people) and `report.json` (for
programs) into the output folder, beside what the checks keep there (the tests' log,
the benchmark's table, the executed notebooks), and exits with status 0 only if every
check passed: a skipped check (a package installed without `tests/` or `notebooks/`)
is not a pass, so run it from a checkout.

Without a CUDA device it says so in one line and exits with status 2, and an output
folder it cannot write into is refused before any check runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from . import cuda_checks as checks
from .cuda_checks import CheckFailed, CheckSkipped, Context

__all__ = ["CHECKS", "Check", "main", "run_checks", "write_report"]

PROG = "python -m sophia.gpucheck"
DEFAULT_OUT = "gpucheck"


# ## The checks
#
# A name, the function, its budget in seconds and one line of what it shows. The
# budgets add up to eight minutes, the most a run may take; a cached build leaves
# most of its two minutes unused.
@dataclass(frozen=True)
class Check:
    r"""One named check: `run(ctx)` returns its figures within `budget_s` seconds."""

    name: str
    run: Callable[[Context], dict]
    budget_s: float
    what: str


CHECKS = [
    Check("build", checks.build, 120, "the CUDA extension builds and imports"),
    Check("pytest", checks.pytest_cuda, 90, "`pytest -m cuda` passes"),
    Check(
        "quadratics",
        checks.agreement_quadratics,
        15,
        "foreach and fused agree with the reference on quadratics",
    ),
    Check(
        "gpt",
        checks.agreement_gpt,
        15,
        "foreach and fused agree with the reference on the small GPT",
    ),
    Check(
        "graph",
        checks.graph_capture,
        10,
        "a captured step with a tensor lr replays like eager steps",
    ),
    Check(
        "grad_scaler",
        checks.grad_scaler_skip,
        10,
        "a step GradScaler skips changes nothing",
    ),
    Check(
        "no_sync",
        checks.no_host_sync,
        10,
        "a default step does not wait for the device",
    ),
    Check(
        "benchmark",
        checks.benchmark,
        60,
        "the step at 125M parameters in 150 tensors against AdamW",
    ),
    Check("notebooks", checks.notebooks, 150, "the four notebooks run on the GPU"),
]


# ## Running them
#
# The budget is an alarm signal that raises `CheckTimeout` in the check, which also
# ends a subprocess it waits for (`subprocess.run` kills its child on any exception).
# Signals reach only the main thread, so elsewhere a check runs without a deadline.
class CheckTimeout(Exception):
    r"""A check ran past its budget."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout(f"stopped after its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# One check's record: its status (`passed`, `failed`, `skipped`, `timeout` or
# `error`), seconds, budget, figures and message. A crash keeps its traceback in a file
# beside the report; `SystemExit` counts as a crash, since a check that calls a
# command's `main` may meet `parser.error`.
def run_check(check: Check, ctx: Context) -> dict:
    r"""Run `check` on `ctx` under its budget and return its record."""
    status, message, figures = "passed", "", {}
    start = time.perf_counter()
    try:
        with _deadline(check.budget_s):
            figures = check.run(ctx) or {}
    except CheckFailed as failure:
        status, message, figures = "failed", str(failure), failure.figures
    except CheckSkipped as skip:
        status, message = "skipped", str(skip)
    except CheckTimeout as timeout:
        status, message = "timeout", str(timeout)
    except (Exception, SystemExit) as error:
        status, message = "error", f"{type(error).__name__}: {error}"
        trace = ctx.out / f"{check.name}.traceback.txt"
        trace.write_text(traceback.format_exc())
        message += f" (traceback in {trace.name})"
    return {
        "name": check.name,
        "what": check.what,
        "status": status,
        "seconds": time.perf_counter() - start,
        "budget_s": check.budget_s,
        "figures": figures,
        "message": message,
    }


# The checks in order, a line on stdout as each ends. Between checks the GPU's cached
# memory is released, so the notebooks' kernels find it free.
def run_checks(check_list: list[Check], ctx: Context) -> list[dict]:
    r"""Run every check of `check_list` on `ctx`, whatever the others did."""
    records = []
    for i, check in enumerate(check_list, 1):
        print(f"[{i}/{len(check_list)}] {check.name}: {check.what} ...", flush=True)
        record = run_check(check, ctx)
        records.append(record)
        print(
            f"    {record['status']} in {record['seconds']:.1f} s {record['message']}"
        )
        if ctx.device.type == "cuda":
            with contextlib.suppress(RuntimeError):
                torch.cuda.empty_cache()
    return records


# ## The report
#
# The machine first (what makes two reports comparable), then one row per check, then
# each check's figures. The JSON holds the same records.
def environment(device: torch.device) -> dict:
    r"""The facts of this machine and build that a report is read with."""
    from .. import __version__
    from .measure import _device_name

    found = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sophia": __version__,
        "python": platform.python_version(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
            " ", "seconds"
        ),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        found["capability"] = f"sm_{major}{minor}"
    return found


def passed(records: list[dict]) -> bool:
    r"""Whether every check passed (a skipped one did not)."""
    return bool(records) and all(r["status"] == "passed" for r in records)


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(env: dict, records: list[dict], seconds: float) -> str:
    bad = [f"{r['name']} ({r['status']})" for r in records if r["status"] != "passed"]
    verdict = "PASSED" if passed(records) else "FAILED"
    count = sum(r["status"] == "passed" for r in records)
    lines = [f"# {PROG}", "", f"**{verdict}**: {count} of {len(records)} checks passed"]
    lines[-1] += f"; not passed: {', '.join(bad)}." if bad else "."
    lines += ["", "| | |", "|---|---|"]
    lines += [f"| {key} | {_value(value)} |" for key, value in env.items()]
    lines += [f"| total | {seconds:.0f} s |", ""]
    lines += ["| check | status | seconds | budget | what |", "|---|---|--:|--:|---|"]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | "
            f"{r['budget_s']:g} | {_value(r['what'])} |"
        )
    for r in records:
        lines += ["", f"## {r['name']}: {r['status']}", "", f"Shows that {r['what']}."]
        if r["message"]:
            lines += ["", f"> {_value(r['message'])}"]
        if r["figures"]:
            lines += ["", "| figure | value |", "|---|--:|"]
            lines += [f"| {k} | {_value(v)} |" for k, v in r["figures"].items()]
    return "\n".join(lines) + "\n"


def write_report(out: Path, env: dict, records: list[dict], seconds: float) -> None:
    r"""Write `report.md` and `report.json` into `out`."""
    report = {"passed": passed(records), "seconds": seconds, "environment": env}
    report["checks"] = records
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_markdown(env, records, seconds))


# ## The command line
#
# `--out` is checked before anything runs, and without creating it: the folder, or
# the nearest folder above it that exists, must take a file. A refusal is one line on
# stderr and exit status 2, the usage-error convention.
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Verify the CUDA path on one GPU and write report.md and "
        "report.json; exit 0 only if every check passed, 2 without CUDA.",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help="folder for the report and what the checks keep (default: %(default)s)",
    )
    return parser


def _refuse(message: str) -> NoReturn:
    print(f"{PROG}: error: argument --out: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_out(text: str) -> Path:
    if not text.strip():
        _refuse(f"an empty path ({text!r})")
    out = Path(text).expanduser()
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        _refuse(f"{str(existing)!r} is not a folder ({text!r})")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        _refuse(
            f"cannot write into {str(existing)!r} ({text!r}): {error.strerror or error}"
        )
    return out


# The device, or `None` without CUDA: a function, so that the tests can hand the
# command the CPU.
def _find_device() -> torch.device | None:
    return torch.device("cuda") if torch.cuda.is_available() else None


# The checkout the package was imported from, if it is one: the folder above
# `sophia/` that holds `pyproject.toml`.
def _checkout() -> Path | None:
    root = Path(checks.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def main(argv: list[str] | None = None) -> int:
    r"""Run the command with arguments `argv`; return its exit status."""
    out = _check_out(_parser().parse_args(argv).out)
    device = _find_device()
    if device is None:
        print(
            f"{PROG}: no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); nothing was checked",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, device=device, repo=_checkout())
    env = environment(device)
    start = time.perf_counter()
    records = run_checks(CHECKS, ctx)
    write_report(out, env, records, time.perf_counter() - start)
    verdict = "passed" if passed(records) else "FAILED"
    print(f"{PROG}: {verdict}; report in {out / 'report.md'}")
    return 0 if passed(records) else 1


if __name__ == "__main__":
    sys.exit(main())
