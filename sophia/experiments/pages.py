r"""
---
title: The results pages, written from the data
summary: The tables and the numbers quoted in sentences on the results, hyperparameters, landing and algorithm pages, each computed from the data of the documented runs; how a page marks them, and how they are rewritten and checked.
---

Every table of the [results](../../results.md) page, and every number a sentence
there (or on the hyperparameters, landing and algorithm pages) quotes, is computed
here from the [documented runs' data](studies.html). In a page, a table lives between
`<!-- results: NAME -->` and `<!-- /results -->`, each on a line of its own, and a
number in a sentence in `<span data-value="NAME">...</span>` (a comment would end the
paragraph where a line starts with one; a span does not, and shows nothing).
[`python -m sophia.experiments.results write`](results.html) replaces what stands
between the markers, and nothing else; `check` compares.
"""

from __future__ import annotations

import inspect
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from ..optimizer import SophiaG, SophiaH
from .compare import _by_optimizer, _mean_curve, plot, steps_to_reach, summarize
from .config import OPTIMIZER_DEFAULTS
from .studies import (
    LR_SWEEP,
    ROOT,
    SOPHIAG_GRID,
    SOPHIAH_RHOS,
    WINRATE,
    command,
    load_runs,
    summary,
    winrate_data,
)
from .train import RunResult


# ## Formatting
#
# Losses to three decimals, with the spread over seeds where there are several; the
# best value of a column in bold.
def loss(row: dict) -> str:
    text = f"{row['final_val_loss_mean']:.3f}"
    if row["seeds"] > 1:
        text += f" ± {row['final_val_loss_std']:.3f}"
    return text


def win(row: dict) -> str:
    return "—" if row["win_rate_mean"] is None else f"{row['win_rate_mean']:.2f}"


def _bold_min(cells: list[str], values: list[float]) -> list[str]:
    best = min(range(len(values)), key=values.__getitem__)
    return [f"**{c}**" if i == best else c for i, c in enumerate(cells)]


def _table(header: list[str], align: str, rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


# ## The tables
#
# Each takes the data's root and returns Markdown. Step 1: the learning-rate sweep.
def lr_sweep_table(root: Path, win_rates: bool = True) -> str:
    rows = [summary(f"lr-{adamw}", root) for adamw, _ in LR_SWEEP]
    cols = {}
    for name in ("adamw", "sophiag", "sophiah"):
        cells = [loss(r[name]) for r in rows]
        if win_rates and name != "adamw":
            cells = [f"{c} ({win(r[name])})" for c, r in zip(cells, rows)]
        cols[name] = _bold_min(cells, [r[name]["final_val_loss_mean"] for r in rows])
    body = [
        [adamw, cols["adamw"][i], sophia, cols["sophiag"][i], cols["sophiah"][i]]
        for i, (adamw, sophia) in enumerate(LR_SWEEP)
    ]
    suffix = " (win rate)" if win_rates else ""
    header = [
        "AdamW lr", "final loss", "Sophia lr",
        f"Sophia-G final loss{suffix}", f"Sophia-H final loss{suffix}",
    ]  # fmt: skip
    return _table(header, "rrrrr", body)


def sophiah_rho_table(root: Path) -> str:
    rows = [summary(f"rho-sophiah-{rho}", root)["sophiah"] for rho in SOPHIAH_RHOS]
    cells = _bold_min([loss(r) for r in rows], [r["final_val_loss_mean"] for r in rows])
    body = [
        [
            rho,
            cell,
            f"{r['final_val_loss_min']:.3f}–{r['final_val_loss_max']:.3f}",
            win(r),
        ]
        for rho, cell, r in zip(SOPHIAH_RHOS, cells, rows)
    ]
    header = ["$\\rho$", "final loss (3 seeds)", "seeds' range", "mean win rate"]
    return _table(header, "rrrr", body)


def sophiag_grid_table(root: Path, beta1: str | None = None) -> str:
    grid = [g for g in SOPHIAG_GRID if beta1 is None or g[2] == beta1]
    rows = [
        summary(f"grid-sophiag-{lr}-{rho}-{b}", root)["sophiag"] for lr, rho, b in grid
    ]
    cells = _bold_min([loss(r) for r in rows], [r["final_val_loss_mean"] for r in rows])
    body = [[*g, c, win(r)] for g, c, r in zip(grid, cells, rows)]
    header = ["$\\eta$", "$\\rho$", "$\\beta_1$", "final loss", "win rate"]
    return _table(header, "rrrrr", body)


# Step 3: three seeds. The tuned Sophia-G ran in a study of its own; its steps to
# AdamW's final loss are read against the main study's AdamW curve.
FINAL_LABELS = {
    "adamw": "AdamW (lr 6e-3)",
    "sophiag": "Sophia-G (lr 6e-4)",
    "signmomentum": "sign momentum (lr 6e-4)",
    "sophiah": "Sophia-H (lr 6e-4, $\\rho$ 0.01)",
}
TUNED_LABEL = "Sophia-G, $\\beta_1$ 0.9, $\\rho$ 1 (lr 1e-3)"


def _against_adamw(runs: list[RunResult], adamw: list[RunResult]) -> tuple:
    target = statistics.fmean(r.final_val_loss for r in adamw)
    base = _mean_curve(adamw, "val_losses")
    steps = adamw[0].eval_steps
    reach = steps_to_reach(runs[0].eval_steps, _mean_curve(runs, "val_losses"), target)
    final = statistics.fmean(r.final_val_loss for r in runs)
    return reach, steps_to_reach(steps, base, final)


def three_seeds_rows(root: Path) -> list[tuple[str, dict, tuple]]:
    final = load_runs("final", root)
    by_name = _by_optimizer(final)
    rows = summarize(final)
    out = [
        (
            FINAL_LABELS[r["optimizer"]],
            r,
            _against_adamw(by_name[r["optimizer"]], by_name["adamw"]),
        )
        for r in rows
    ]
    tuned = load_runs("tuned", root)
    out.append(
        (
            TUNED_LABEL,
            summarize(tuned)[0],
            _against_adamw(tuned, by_name["adamw"]),
        )
    )
    return out


def _steps(value: float | None, total: int) -> str:
    return f"never in {total}" if value is None else f"{value:.0f}"


def three_seeds_table(root: Path) -> str:
    body = []
    for label, r, (reach, match) in three_seeds_rows(root):
        overhead = (
            "—" if r["win_rate_mean"] is None else f"{r['hessian_overhead_pct']:.1f} %"
        )
        ratio = "" if reach is None else f" ({reach / r['steps']:.2f})"
        body.append(
            [
                label,
                loss(r),
                _steps(reach, r["steps"]) + ratio,
                _steps(match, r["steps"]),
                f"{r['timed_ms_per_step']:.1f}",
                overhead,
                win(r),
            ]
        )
    header = [
        "optimizer", "final val loss", "steps to AdamW's final",
        "AdamW steps to this loss", "ms per step", "Hessian overhead",
        "mean win rate",
    ]  # fmt: skip
    return _table(header, "lrrrrrr", body)


# $\beta_1$ at three seeds, for the hyperparameters page: AdamW, the reference
# Sophia-G and the tuned one.
def beta1_table(root: Path) -> str:
    rows = three_seeds_rows(root)
    labels = {
        FINAL_LABELS["adamw"]: r"AdamW, $\eta$ 6e-3 (for reference)",
        FINAL_LABELS[
            "sophiag"
        ]: r"$\beta_1$ 0.965, $\rho$ 0.05, $\eta$ 6e-4 (reference)",
        TUNED_LABEL: r"$\beta_1$ 0.9, $\rho$ 1, $\eta$ 1e-3",
    }
    body = [
        [label, loss(r), win(r)]
        for key, label in labels.items()
        for name, r, _ in rows
        if name == key
    ]
    return _table(["setting (three seeds)", "final loss", "win rate"], "lrr", body)


# The refresh's cost alone, for the hyperparameters page.
def refresh_cost_table(root: Path) -> str:
    rows = summary("final", root)
    body = [
        [
            FINAL_LABELS[name].split(" (")[0],
            f"{r['timed_ms_per_step']:.1f}",
            "—" if r["refresh_ms"] is None else f"{r['refresh_ms']:.0f}",
            "—" if r["refresh_ms"] is None else f"{r['hessian_overhead_pct']:.1f} %",
        ]
        for name, r in rows.items()
    ]
    header = ["optimizer", "ms per step", "ms per refresh", "Hessian overhead"]
    return _table(header, "lrrr", body)


# The horizon: the same three optimizers after 400 and after 1600 steps.
HORIZON = ("adamw", "sophiag", "signmomentum")


def horizon_table(root: Path) -> str:
    short, long = summary("final", root), summary("horizon-1600", root)
    body = []
    for name in HORIZON:
        cells = [FINAL_LABELS[name].split(" (")[0]]
        for rows in (short, long):
            r = rows[name]
            gap = r["final_val_loss_mean"] - rows["adamw"]["final_val_loss_mean"]
            cells += [loss(r), "—" if name == "adamw" else f"{gap:+.3f}", win(r)]
        body.append(cells)
    header = [
        "optimizer", "400 steps", "vs AdamW", "win rate",
        "1600 steps", "vs AdamW", "win rate",
    ]  # fmt: skip
    return _table(header, "lrrrrrr", body)


def batch_size_table(root: Path) -> str:
    data = winrate_data(root)
    body = [
        [str(b["batch_size"]), f"{b['tokens_per_step']:,}", f"{b['final_val_loss']:.3f}",
         f"{b['win_rate_mean']:.3f}"]
        for b in data["batch_sizes"]
    ]  # fmt: skip
    header = ["sequences per step", "$B$", "final loss (seed 0)", "mean win rate"]
    return _table(header, "rrrr", body)


def commands_block(names: list[str]) -> str:
    return "```bash\n" + "\n".join(command(n) for n in names) + "\n```"


# Every block, by the name its markers carry.
BLOCKS: dict[str, Callable[[Path], str]] = {
    "lr-sweep": lr_sweep_table,
    "lr-sweep-losses": lambda root: lr_sweep_table(root, win_rates=False),
    "sophiah-rho": sophiah_rho_table,
    "sophiag-grid": sophiag_grid_table,
    "sophiag-rho": lambda root: sophiag_grid_table(root, beta1="0.965"),
    "three-seeds": three_seeds_table,
    "refresh-cost": refresh_cost_table,
    "beta1": beta1_table,
    "horizon": horizon_table,
    "batch-size": batch_size_table,
    "commands-lr": lambda root: commands_block([f"lr-{a}" for a, _ in LR_SWEEP]),
    "commands-sophiah-rho": lambda root: commands_block(
        [f"rho-sophiah-{r}" for r in SOPHIAH_RHOS]
    ),
    "commands-sophiag-grid": lambda root: commands_block(
        [f"grid-sophiag-{lr}-{rho}-{b}" for lr, rho, b in SOPHIAG_GRID]
    ),
    "commands-final": lambda root: commands_block(["final", "tuned"]),
    "commands-horizon": lambda root: commands_block(["horizon-1600"]),
    "commands-winrate": lambda root: commands_block([WINRATE]),
}


# ## The numbers in sentences
#
# Each a short string, from the same data.
def values(root: Path) -> dict[str, str]:
    # The defaults the pages quote: the constructors' and the training script's.
    out: dict[str, str] = {}
    for cls in (SophiaG, SophiaH):
        rho = inspect.signature(cls).parameters["rho"].default
        out[f"api.{cls.__name__.lower()}.rho"] = f"{rho:g}"
    for name in ("sophiag", "sophiah"):
        out[f"train.{name}.rho"] = f"{OPTIMIZER_DEFAULTS[name]['rho']:g}"
    final = summary("final", root)
    adamw = final["adamw"]["final_val_loss_mean"]
    for name, r in final.items():
        out[f"final.{name}"] = loss(r)
    for label, r, (_, match) in three_seeds_rows(root):
        if label == TUNED_LABEL:
            out["tuned"] = loss(r)
            out["tuned.gap"] = f"{r['final_val_loss_mean'] - adamw:.2f}"
        elif r["optimizer"] == "sophiag":
            out["final.sophiag.adamw-steps"] = _steps(match, r["steps"])
    out["final.sophiag.overhead"] = f"{final['sophiag']['hessian_overhead_pct']:.0f} %"
    out["final.sophiah.overhead"] = f"{final['sophiah']['hessian_overhead_pct']:.0f} %"
    out["final.gap"] = f"{final['sophiag']['final_val_loss_mean'] - adamw:.2f}"
    horizon = summary("horizon-1600", root)
    out["horizon.sophiag.win"] = win(horizon["sophiag"])
    diff = (
        horizon["signmomentum"]["final_val_loss_mean"]
        - horizon["sophiag"]["final_val_loss_mean"]
    )
    out["horizon.hessian-gain"] = f"{diff:+.3f}"
    # On how many seeds Sophia-G ended below sign momentum: the same seed is the same
    # initial weights and batches, so the comparison is paired.
    for study, key in (("final", "final"), ("horizon-1600", "horizon")):
        ends = {(r.optimizer, r.seed): r.final_val_loss for r in load_runs(study, root)}
        seeds = sorted({seed for _, seed in ends})
        wins = sum(ends[("sophiag", s)] < ends[("signmomentum", s)] for s in seeds)
        out[f"{key}.hessian-seeds"] = f"{wins} of {len(seeds)}"
    diff = (
        final["signmomentum"]["final_val_loss_mean"]
        - final["sophiag"]["final_val_loss_mean"]
    )
    out["final.hessian-gain"] = f"{diff:+.3f}"
    w = winrate_data(root)
    fill = w["fill_in"]
    out["fill.refreshes"] = str(fill["refreshes"])
    out["fill.final"] = pct(fill["final"])
    out["fill.mean"] = f"{fill['mean']:.2f}"
    out["wr.g"] = f"{w['sophiag']['win_rate_mean']:.3f}"
    out["wr.g.loss"] = f"{w['sophiag']['final_val_loss']:.4f}"
    out["wr.corrected"] = f"{w['sophiag_bias_corrected']['win_rate_mean']:.3f}"
    out["wr.corrected.loss"] = f"{w['sophiag_bias_corrected']['final_val_loss']:.4f}"
    out["wr.corrected.factor"] = (
        f"{w['sophiag_bias_corrected']['win_rate_mean'] / w['sophiag']['win_rate_mean']:.1f}"
    )
    h = w["sophiah"]
    out["wr.h"] = f"{h['win_rate_mean']:.2f}"
    out["wr.h.rho"] = f"{w['config']['sophiah']['rho']:g}"
    out["wr.h.negative"] = pct(h["h_negative_share"])
    out["wr.h.abs-sum"] = f"{h['h_abs_sum']:,.0f}"
    out["wr.h.sum"] = f"{h['h_sum']:,.0f}"
    out["wr.h.wins-positive"] = pct(h["wins_among_positive"])
    out["wr.h.probes"] = str(h["probes"])
    out["wr.h.hutchinson-sum"] = f"{h['hutchinson_sum']:,.0f}"
    out["wr.h.hutchinson-negative"] = pct(h["hutchinson_negative_share"])
    out["wr.h.gnb-sum"] = f"{h['gnb_sum']:,.0f}"
    out["wr.corrected.clipped"] = pct(1 - w["sophiag_bias_corrected"]["win_rate_mean"])
    out["wr.h.noise-ratio"] = f"{h['h_abs_sum'] / h['h_sum']:.0f}"
    out["wr.h.sum-share"] = f"{h['h_sum'] / h['hutchinson_sum']:.2f}"
    out.update(_sophiah_rho_values(root, f"{w['config']['sophiah']['rho']:g}"))
    out["tuned.level"] = _level(root)
    return out


# The best $\rho$ of Sophia-H's sweep, and on how many seeds it beat the default.
def _sophiah_rho_values(root: Path, default: str) -> dict[str, str]:
    ends = {
        rho: {r.seed: r.final_val_loss for r in load_runs(f"rho-sophiah-{rho}", root)}
        for rho in SOPHIAH_RHOS
    }
    best = min(SOPHIAH_RHOS, key=lambda rho: statistics.fmean(ends[rho].values()))
    wins = sum(ends[best][s] < ends[default][s] for s in ends[default])
    return {
        "sophiah-rho.best": best,
        "sophiah-rho.best-seeds": f"{wins} of {len(ends[default])}",
    }


# The first and last evaluations at which the tuned Sophia-G's mean curve is within
# 0.01 of AdamW's (or below it): "level with AdamW between steps ... and ...".
def _level(root: Path) -> str:
    adamw = _by_optimizer(load_runs("final", root))["adamw"]
    tuned = load_runs("tuned", root)
    base, mine = _mean_curve(adamw, "val_losses"), _mean_curve(tuned, "val_losses")
    level = [
        s for s, a, t in zip(tuned[0].eval_steps, base, mine) if s > 0 and t - a <= 0.01
    ]
    return f"{level[0]} and {level[-1]}" if level else "never"


# ## Writing and checking the pages
#
# The pages that hold blocks, and the two figures drawn from the data.
PAGES = (
    "docs/results.md",
    "docs/hyperparameters.md",
    "docs/index.md",
    "docs/algorithm.md",
)
FIGURES = {
    "docs/img/compare-400-steps.png": ("final", "400 steps, three seeds"),
    "docs/img/compare-1600-steps.png": ("horizon-1600", "1600 steps, three seeds"),
}

BLOCK = re.compile(r"(<!-- results: ([\w.-]+) -->\n)(.*?)(<!-- /results -->)", re.S)
VALUE = re.compile(r'(<span data-value="([\w.-]+)">)(.*?)(</span>)', re.S)


def render(text: str, root: Path, page: str = "page") -> str:
    r"""`text` with every block and value replaced by what the data says."""
    cache: dict[str, str] = {}
    vals: dict[str, str] | None = None

    def block(m: re.Match) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise KeyError(f"{page}: unknown results block {name!r}")
        if name not in cache:
            cache[name] = BLOCKS[name](root)
        # Blank lines around it: a Markdown block that starts with a comment would
        # be read as raw HTML, and the table with it.
        return m.group(1) + "\n" + cache[name] + "\n\n" + m.group(4)

    def value(m: re.Match) -> str:
        nonlocal vals
        if vals is None:
            vals = values(root)
        if m.group(2) not in vals:
            raise KeyError(f"{page}: unknown value {m.group(2)!r}")
        return m.group(1) + vals[m.group(2)] + m.group(4)

    return VALUE.sub(value, BLOCK.sub(block, text))


def differences(root: Path = ROOT) -> list[str]:
    r"""One line per block or value of a page that differs from the data."""
    found = []
    for page in PAGES:
        text = (root / page).read_text()
        want = render(text, root, page)
        if want == text:
            continue
        for pattern in (BLOCK, VALUE):
            have = {m.group(2): m.group(3) for m in pattern.finditer(text)}
            for m in pattern.finditer(want):
                if have.get(m.group(2)) != m.group(3):
                    found.append(f"{page}: {m.group(2)} differs from docs/data")
    return found


def write(root: Path = ROOT) -> list[Path]:
    r"""Regenerate every page's blocks and values, and the figures; the paths."""
    written = []
    for page in PAGES:
        path = root / page
        text = path.read_text()
        new = render(text, root, page)
        if new != text:
            path.write_text(new)
            written.append(path)
    for figure, (name, title) in FIGURES.items():
        runs = load_runs(name, root)
        size = f"GPT ({runs[0].n_params / 1e6:.2f}M parameters), {title}"
        (root / figure).parent.mkdir(parents=True, exist_ok=True)
        plot(runs, root / figure, title=size)
        written.append(root / figure)
    return written
