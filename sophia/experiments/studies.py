r"""
---
title: The documented runs, and their data
summary: Every run behind the results pages as a command, how each is run and what of it is kept under docs/data, and how that data is read back.
---

A number on the [results](../../results.md) or
[hyperparameters](../../hyperparameters.md) page is only as good as the run behind it,
so none is typed by hand. This module holds the list of documented runs
(`STUDIES`: each a `python -m sophia.train compare` command, plus the
[win-rate measurements](winrate.html)), runs them, and reads their data back;
[the pages](pages.html) turns that data into tables and numbers, and
[`python -m sophia.experiments.results`](results.html) is the command for both.

A study runs in `runs/results/NAME`, and what the pages need is kept in
`docs/data/NAME/`: `compare.csv` (the summary `compare` prints) and `runs.json` (every
run's evaluations, win rates and timings; the per-step training losses are left out,
they stay in `runs/`). The losses are deterministic (one thread, seeded streams):
rerunning a study gives the same losses and win rates to the last digit on the same
torch build. The milliseconds are measured, and move with the machine's load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from .compare import summarize, write_csv
from .train import RunResult

# The repository this module sits in: `docs/` is beside `sophia/`.
ROOT = Path(__file__).resolve().parents[2]

# ## The studies
#
# The peak learning rates of the sweep, AdamW's and Sophia's side by side (Sophia's
# $\eta$ is the largest step per coordinate, so its best value is several times
# smaller); the $\rho$ of Sophia-H's sweep; the $(\eta, \rho, \beta_1)$ of Sophia-G's.
LR_SWEEP = (
    ("1e-3", "2e-4"),
    ("3e-3", "6e-4"),
    ("6e-3", "1e-3"),
    ("1e-2", "2e-3"),
    ("2e-2", "4e-3"),
)
SOPHIAH_RHOS = ("0.005", "0.01", "0.02", "0.05", "0.1")
SOPHIAG_GRID = (
    ("6e-4", "0.05", "0.965"),
    ("6e-4", "0.3", "0.965"),
    ("6e-4", "1.0", "0.965"),
    ("2e-3", "0.05", "0.965"),
    ("2e-3", "0.3", "0.965"),
    ("2e-3", "1.0", "0.965"),
    ("6e-4", "1.0", "0.9"),
    ("1e-3", "1.0", "0.9"),
)


def _studies() -> dict[str, list[str]]:
    studies: dict[str, list[str]] = {}
    for adamw, sophia in LR_SWEEP:
        studies[f"lr-{adamw}"] = [
            "--seeds", "0", "--lr", f"adamw={adamw}",
            "--lr", f"sophiag={sophia}", "--lr", f"sophiah={sophia}",
        ]  # fmt: skip
    for rho in SOPHIAH_RHOS:
        studies[f"rho-sophiah-{rho}"] = [
            "--optimizers", "sophiah", "--seeds", "0", "1", "2", "--rho", rho,
        ]  # fmt: skip
    for lr, rho, beta1 in SOPHIAG_GRID:
        studies[f"grid-sophiag-{lr}-{rho}-{beta1}"] = [
            "--optimizers", "sophiag", "--seeds", "0", "--lr", f"sophiag={lr}",
            "--rho", rho, "--betas", beta1, "0.99",
        ]  # fmt: skip
    studies["final"] = [
        "--optimizers", "adamw", "sophiag", "signmomentum", "sophiah",
        "--seeds", "0", "1", "2",
    ]  # fmt: skip
    studies["tuned"] = [
        "--optimizers", "sophiag", "--seeds", "0", "1", "2",
        "--lr", "sophiag=1e-3", "--rho", "1.0", "--betas", "0.9", "0.99",
    ]  # fmt: skip
    studies["horizon-1600"] = [
        "--optimizers", "adamw", "sophiag", "signmomentum",
        "--seeds", "0", "1", "2", "--steps", "1600",
    ]  # fmt: skip
    return studies


# Each study's arguments to `python -m sophia.train compare`; `winrate` is the
# measurement module's own command.
STUDIES = _studies()
WINRATE = "winrate"


def command(name: str) -> str:
    r"""The command line of study `name`, as a reader would type it."""
    if name == WINRATE:
        return "python -m sophia.experiments.winrate --out docs/data/winrate.json"
    return " ".join(
        ["python -m sophia.train compare", *STUDIES[name], "--out", f"runs/{name}"]
    )


# ## Running the studies
#
# A study runs in `runs/results/NAME` (labml's files and the figure go there too), and
# only its summary and its runs, without the per-step training losses, are copied
# into `docs/data/NAME`.
def run_study(name: str, root: Path = ROOT) -> None:
    r"""Run study `name` and keep its data under `root/docs/data`."""
    data = root / "docs" / "data"
    if name == WINRATE:
        data.mkdir(parents=True, exist_ok=True)
        _call(["-m", "sophia.experiments.winrate", "--out", str(data / "winrate.json")])
        return
    out = root / "runs" / "results" / name
    if out.exists():
        shutil.rmtree(out)
    _call(
        ["-m", "sophia.train", "compare", *STUDIES[name], "--out", str(out), "--quiet"]
    )
    keep(name, out, root)


def keep(name: str, out: Path, root: Path = ROOT) -> None:
    r"""Copy study `name`'s summary and runs from its `--out` folder `out`."""
    dest = root / "docs" / "data" / name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "compare.csv", dest / "compare.csv")
    runs = json.loads((out / "runs.json").read_text())
    for r in runs:
        r.pop("train_losses")
    (dest / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")


def _call(args: list[str]) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def has_data(name: str, root: Path = ROOT) -> bool:
    r"""Whether study `name` has its data under `root/docs/data`."""
    data = root / "docs" / "data"
    if name == WINRATE:
        return (data / "winrate.json").exists()
    return (data / name / "runs.json").exists()


# ## Reading the data
#
# A study's runs, its summary rows by optimizer, and the win-rate measurements; each
# missing file is an error that names the command that makes it.
def load_runs(name: str, root: Path = ROOT) -> list[RunResult]:
    r"""The runs of study `name`, from `docs/data/NAME/runs.json`."""
    path = root / "docs" / "data" / name / "runs.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no data for study {name!r} at {path}: run "
            f"`python -m sophia.experiments.results run --only {name}`"
        )
    return [RunResult.from_dict(r) for r in json.loads(path.read_text())]


# One row of `summarize` per optimizer, by name.
def summary(name: str, root: Path = ROOT) -> dict[str, dict]:
    r"""The summary rows of study `name`, keyed by optimizer."""
    return {row["optimizer"]: row for row in summarize(load_runs(name, root))}


def winrate_data(root: Path) -> dict:
    path = root / "docs" / "data" / "winrate.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no data at {path}: run `python -m sophia.experiments.results run "
            f"--only {WINRATE}`"
        )
    return json.loads(path.read_text())


# The committed `compare.csv` of each study, as `compare` would write it from the
# committed runs.
def csv_matches(name: str, root: Path, tmp: Path) -> bool:
    write_csv(summarize(load_runs(name, root)), tmp)
    return (
        tmp.read_bytes() == (root / "docs" / "data" / name / "compare.csv").read_bytes()
    )
