r"""
---
title: Comparing AdamW with Sophia
summary: Train every optimizer with the same seeds and batches; steps to a target loss, a summary over seeds, a CSV file, a Markdown table and a figure.
---

`python -m sophia.train compare --out DIR` trains AdamW, Sophia-G and Sophia-H with the
[training loop](train.html), from the same initial weights, on the same batches in
the same order, for each of `--seeds`, and writes a figure, a CSV file and a Markdown
table into `DIR`. `--optimizers adamw sophiag signmomentum sophiah` adds the
sign-momentum baseline, Sophia-G with $h = 0$ (never refreshed), which shows what the
Hessian adds. Its defaults (a model of about 0.8 M parameters, a few hundred
steps) make it a job of a few minutes on two CPU cores, with no download. On a GPU
(Colab), the bigger model and Tiny Shakespeare:

```
python -m sophia.train compare --model gpu --device cuda --data shakespeare \
    --steps 2000 --out runs/gpu
```

The default learning rates were tuned for the CPU model: sweep `--lr` with single
runs, then pass the best to `compare` as `--lr adamw=... --lr sophiag=...`, before
trusting a comparison of the GPU model. From a notebook, `compare(...)` returns a
list of `RunResult`s. Why the comparison is built as it is: on
[how the training script is built](../../engineering/training.md#comparing-optimizers).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import COMPARED, OPTIMIZERS, REFRESHING, TrainConfig, parse_device
from .data import Corpus, load_corpus
from .train import (
    RunResult,
    _build_model,
    _generators,
    _timed,
    make_optimizer,
    refresh_hessian,
    train,
    train_batch,
    train_step,
)

# Rounds of the interleaved timing (one more is run first, as a warm-up).
TIMING_REPEATS = 5


# ## Comparing optimizers
#
# Every optimizer, every seed, the same configuration otherwise; with one seed, every
# optimizer starts from the same weights and sees the same batches.
def compare(
    base: TrainConfig,
    optimizers: list[str] | tuple[str, ...] = COMPARED,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    *,
    corpus: Corpus | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    timing_repeats: int = TIMING_REPEATS,
) -> list[RunResult]:
    r"""Train `base` with each of `optimizers` and `seeds`; the results in that order.

    `overrides` maps an optimizer's name to fields of `TrainConfig` that differ for it,
    e.g. `{"adamw": {"lr": 3e-3}}`. Then one step and one refresh of each optimizer are
    timed, interleaved, `timing_repeats` times (0: not at all), and their medians set
    on every result (`step_ms`, `refresh_ms`).
    """
    # Checked in full first: a mistake should not surface after an hour of runs.
    if not optimizers:
        raise ValueError("compare needs at least one optimizer")
    if not seeds:
        raise ValueError("compare needs at least one seed")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}"
            )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int):
        raise ValueError(f"timing_repeats must be an int >= 0, got {timing_repeats!r}")
    if timing_repeats < 0:
        raise ValueError(f"timing_repeats must be an int >= 0, got {timing_repeats!r}")
    overrides = overrides or {}
    for name in overrides:
        if name not in optimizers:
            raise ValueError(
                f"overrides for {name!r}, which is not among the optimizers "
                f"{list(optimizers)}"
            )
    # `dataclasses.replace` runs `__post_init__`, so each configuration is checked now.
    configs = {
        name: dataclasses.replace(base, optimizer=name, **overrides.get(name, {}))
        for name in optimizers
    }
    if corpus is None:
        corpus = load_corpus(base.data, cache_dir=base.data_dir)
    results = []
    # One run at a time: their clocks measure the machine's load as well.
    for name in optimizers:
        for seed in seeds:
            config = dataclasses.replace(configs[name], seed=seed)
            results.append(train(config, corpus=corpus))
    if timing_repeats:
        timings = time_interleaved(configs, corpus, timing_repeats)
        for r in results:
            r.step_ms, r.refresh_ms = timings[r.optimizer]
    return results


# ### Timing, interleaved
#
# The runs above come one after another, so a load that comes and goes on the machine
# (another job, a thermal limit) lands on one optimizer and not another. Here each
# optimizer gets a model of its own and then, round after round, $k$ steps and one
# refresh of each are timed in turn, as [the benchmark](benchmark.html) does: a load
# falls on every optimizer alike, and the median of the rounds ignores a spike. The
# first round warms up (allocations, caches) and is not counted.
def time_interleaved(
    configs: dict[str, TrainConfig], corpus: Corpus, repeats: int = TIMING_REPEATS
) -> dict[str, tuple[float, float | None]]:
    r"""Per optimizer, the median milliseconds of one step and of one refresh (`None`
    without refreshes), timed interleaved over `repeats` rounds of $k$ steps."""
    device = parse_device(next(iter(configs.values())).device)
    setups = {}
    for name, config in configs.items():
        gens = _generators(config.seed, device)
        model = _build_model(config, gens, device)
        opt = make_optimizer(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        setups[name] = (config, gens, model, opt, params)
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in configs}
    for round_ in range(repeats + 1):
        for name, setup in setups.items():
            step, refresh = _time_one_round(setup, corpus, device)
            if round_ > 0:
                times[name][0].append(step)
                if refresh is not None:
                    times[name][1].append(refresh)
    return {
        name: (
            1000 * statistics.median(steps),
            1000 * statistics.median(refreshes) if refreshes else None,
        )
        for name, (steps, refreshes) in times.items()
    }


# One refresh period, $k$ steps and then for Sophia one refresh, each on a batch from
# its own stream, timed as the loop times them; the step's time is the period's mean.
# A single step, right after the other optimizers' turns, would find cold caches.
def _time_one_round(
    setup: tuple, corpus: Corpus, device: torch.device
) -> tuple[float, float | None]:
    config, gens, model, opt, params = setup

    def batch(stream: str) -> tuple[Tensor, Tensor]:
        return train_batch(corpus, config, gens[stream], device)

    def steps() -> None:
        for _ in range(config.hess_interval):
            train_step(model, opt, params, batch("train"), config)

    _, seconds = _timed(device, steps)
    step = seconds / config.hess_interval
    if config.optimizer not in REFRESHING:
        return step, None
    _, refresh = _timed(
        device,
        lambda: refresh_hessian(
            model, opt, params, batch("hessian"), config, gens["samples"]
        ),
    )
    return step, refresh


# The training wall-clock at each evaluation rebuilt from the interleaved medians:
# the steps taken times one step, plus the refreshes run so far times one refresh.
# Without them (a run not made by `compare`), the clock the run itself measured.
def timed_seconds(run: RunResult) -> list[float]:
    r"""Seconds of training at each evaluation, from the interleaved medians if set."""
    if run.step_ms is None:
        return list(run.eval_seconds)
    refresh = run.refresh_ms or 0.0
    return [
        (s * run.step_ms + sum(r <= s for r in run.refresh_steps) * refresh) / 1000
        for s in run.eval_steps
    ]


# Per step, a refresh every $k$ steps included.
def _timed_ms_per_step(run: RunResult) -> float | None:
    if run.step_ms is None:
        return None
    return run.step_ms + len(run.refresh_steps) * (run.refresh_ms or 0.0) / run.steps


# ### Steps to a target loss
#
# The paper's claim, "Sophia reaches the validation loss of AdamW in half the steps",
# with $L^*$ AdamW's final validation loss, compares the first steps at which each
# curve is at or below $L^*$. The loss is known only at evaluations: between the one
# $(s_0, L_0)$ above the target and the first $(s_1, L_1)$ at or below it, the curve is
# taken to be straight, and the crossing is
# $$s^* = s_0 + \frac{L_0 - L^*}{L_0 - L_1}\,(s_1 - s_0) \in (s_0, s_1].$$
# `None` if the curve never reaches the target.
def steps_to_reach(
    steps: list[int], losses: list[float], target: float
) -> float | None:
    r"""The (interpolated) step at which `losses` first falls to `target`, or `None`."""
    for i, (s, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(s)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (l0 - target) / (l0 - loss) * (s - s0)
    return None


# The mean over seeds of one curve, evaluation by evaluation. Steps to a target are
# read off this mean curve: an average of the seeds' own crossings would be undefined
# as soon as one seed never reaches the target.
def _mean_curve(runs: list[RunResult], attr: str) -> list[float]:
    return [
        statistics.fmean(values) for values in zip(*(getattr(r, attr) for r in runs))
    ]


# The runs grouped by optimizer, in the order first seen.
def _by_optimizer(results: list[RunResult]) -> dict[str, list[RunResult]]:
    by_name: dict[str, list[RunResult]] = {}
    for r in results:
        by_name.setdefault(r.optimizer, []).append(r)
    return by_name


# ### The summary
#
# One row per optimizer, over its seeds. The baseline is AdamW when it is in the
# comparison, else the first optimizer; the target $L^*$ is its final validation loss,
# averaged over its seeds. The ratio divides by the baseline's own first crossing of
# $L^*$ (its mean curve may touch $L^*$ before the end), so that it compares a first
# crossing with a first crossing.
def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    r"""One row per optimizer (in the order first seen), over its seeds."""
    by_name = _by_optimizer(results)
    baseline = "adamw" if "adamw" in by_name else next(iter(by_name))
    target = statistics.fmean(r.final_val_loss for r in by_name[baseline])
    base_curve = _mean_curve(by_name[baseline], "val_losses")
    base_steps = steps_to_reach(by_name[baseline][0].eval_steps, base_curve, target)
    rows = []
    for name, runs in by_name.items():
        # `match` is the other way round, the step at which the baseline was where
        # this optimizer ended: "how far behind" when `reach` is missing.
        finals = [r.final_val_loss for r in runs]
        reach = steps_to_reach(
            runs[0].eval_steps, _mean_curve(runs, "val_losses"), target
        )
        match = steps_to_reach(
            by_name[baseline][0].eval_steps, base_curve, statistics.fmean(finals)
        )
        wins = [w for r in runs for w in r.win_rates]
        # The sample standard deviation needs two seeds (zero with one); the
        # perplexity of the mean loss, $e^{\bar L}$, is the seeds' geometric mean.
        rows.append(
            dict(
                optimizer=name,
                impl=runs[0].impl,
                seeds=len(runs),
                steps=runs[0].steps,
                final_val_loss_mean=statistics.fmean(finals),
                final_val_loss_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                final_val_loss_min=min(finals),
                final_val_loss_max=max(finals),
                final_perplexity=math.exp(statistics.fmean(finals)),
                baseline=baseline,
                target_val_loss=target,
                steps_to_target=reach,
                steps_ratio=(reach / base_steps)
                if reach is not None and base_steps
                else None,
                baseline_steps_to_match=match,
                wall_seconds_mean=statistics.fmean(r.wall_seconds for r in runs),
                ms_per_step=statistics.fmean(r.ms_per_step for r in runs),
                hessian_overhead_pct=100.0 * _overhead(runs),
                win_rate_mean=statistics.fmean(wins) if wins else None,
                step_ms=runs[0].step_ms,
                refresh_ms=runs[0].refresh_ms,
                timed_ms_per_step=_timed_ms_per_step(runs[0]),
            )
        )
    return rows


# The share of training spent in refreshes: from the interleaved medians when there
# are some, else from the runs' own clocks.
def _overhead(runs: list[RunResult]) -> float:
    run = runs[0]
    if run.step_ms is None:
        return statistics.fmean(r.hessian_overhead for r in runs)
    refreshes = len(run.refresh_steps) * (run.refresh_ms or 0.0)
    return refreshes / (run.steps * run.step_ms + refreshes)


# ### Writing the summary
#
# The CSV file has every number of a row, unrounded; the Markdown table has the ones
# a reader compares, rounded. The two tuples fix the order of the columns.
CSV_COLUMNS = (
    "optimizer",
    "impl",
    "seeds",
    "steps",
    "final_val_loss_mean",
    "final_val_loss_std",
    "final_val_loss_min",
    "final_val_loss_max",
    "final_perplexity",
    "baseline",
    "target_val_loss",
    "steps_to_target",
    "steps_ratio",
    "baseline_steps_to_match",
    "wall_seconds_mean",
    "ms_per_step",
    "hessian_overhead_pct",
    "win_rate_mean",
    "step_ms",
    "refresh_ms",
    "timed_ms_per_step",
)

MARKDOWN_HEADER = (
    "optimizer",
    "final val loss",
    "val ppl",
    "steps to target",
    "steps vs baseline",
    "baseline steps to this loss",
    "wall-clock, run after run (s)",
    "ms/step, run after run",
    "ms/step, interleaved",
    "Hessian overhead",
    "mean win rate",
)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    r"""The rows as CSV, columns `CSV_COLUMNS`, empty for "not applicable"."""
    # `newline=""`: the `csv` module writes its own line endings.
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS}
            )


_CAPTION = (
    "Final validation loss in nats per byte, mean ± standard deviation over "
    "{seeds} seed(s), after {steps} steps. Target: the {baseline} final mean "
    "validation loss, {target_val_loss:.3f}; steps to reach it read off the mean "
    "validation curve (evaluations interpolated linearly); — where it is never "
    'reached. "Baseline steps to this loss": the steps the {baseline} mean curve '
    "takes to reach this row's final loss. Wall-clock excludes evaluation. "
    '"Run after run": measured one run after another on this machine, so '
    'load-dependent. "Interleaved": the median step, plus its share of the median '
    "refresh, of one step and one refresh of each optimizer timed in turn, "
    "{timing}; the Hessian overhead is the refreshes' share of that time{fallback}. "
    "The win rate is the fraction of coordinates not clipped, averaged over all "
    "refreshes."
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    r"""The summary rows as a Markdown table, with a line saying what the target was."""

    # A dash for "not applicable" (a target never reached, a win rate of AdamW).
    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        return "—" if value is None else f"{value:{spec}}{suffix}"

    # Numbers right-aligned, so that digits line up.
    lines = [
        "| " + " | ".join(MARKDOWN_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(MARKDOWN_HEADER) - 1)) + "|",
    ]
    # AdamW and the sign-momentum baseline have no Hessian, and a dash says so
    # better than "0.0 %".
    for r in rows:
        spread = f" ± {r['final_val_loss_std']:.3f}" if r["seeds"] > 1 else ""
        hessian = (
            "—"
            if r["optimizer"] not in REFRESHING
            else fmt(r["hessian_overhead_pct"], ".1f", " %")
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["optimizer"],
                    f"{r['final_val_loss_mean']:.3f}{spread}",
                    f"{r['final_perplexity']:.2f}",
                    fmt(r["steps_to_target"], ".0f"),
                    fmt(r["steps_ratio"], ".2f", "×"),
                    fmt(r["baseline_steps_to_match"], ".0f"),
                    f"{r['wall_seconds_mean']:.1f}",
                    f"{r['ms_per_step']:.1f}",
                    fmt(r["timed_ms_per_step"], ".1f"),
                    hessian,
                    fmt(r["win_rate_mean"], ".2f"),
                ]
            )
            + " |"
        )
    # A table copied into a report without its caption still says what it measured.
    first = rows[0]
    interleaved = first["step_ms"] is not None
    lines.append("")
    lines.append(
        _CAPTION.format(
            **first,
            timing="medians over rounds" if interleaved else "not measured here",
            fallback="" if interleaved else " (here: of the runs' own clocks)",
        )
    )
    return "\n".join(lines) + "\n"


# ### The figure
#
# The validation loss against steps and against training wall-clock: per optimizer
# the mean over seeds, and a band from the lowest seed to the highest (with a handful
# of seeds, the range is what was seen). The wall-clock is rebuilt from the
# interleaved timing when there is one, and says so on its axis; otherwise it is the
# runs' own, measured one after another, and the axis says that. A `Figure` on an Agg canvas, not `pyplot`,
# so that it neither changes a notebook's backend nor shows up in its output.
def plot(results: list[RunResult], path: Path, *, title: str = "") -> None:
    r"""Validation loss vs steps and vs wall-clock, mean and range over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_steps, ax_time = fig.subplots(1, 2, sharey=True)
    # A line style per optimizer too: sign momentum can lie on Sophia-G's curve.
    styles = ("-", "--", "-.", ":")
    for i, (name, runs) in enumerate(_by_optimizer(results).items()):
        style = styles[i % len(styles)]
        losses = list(zip(*(r.val_losses for r in runs)))
        mean = [statistics.fmean(v) for v in losses]
        low, high = [min(v) for v in losses], [max(v) for v in losses]
        steps = runs[0].eval_steps
        seconds = [statistics.fmean(v) for v in zip(*map(timed_seconds, runs))]
        label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        # One colour per optimizer, on both panels.
        (line,) = ax_steps.plot(steps, mean, style, label=label)
        ax_steps.fill_between(
            steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0
        )
        ax_time.plot(seconds, mean, style, color=line.get_color(), label=label)
        ax_time.fill_between(
            seconds, low, high, color=line.get_color(), alpha=0.2, linewidth=0
        )
    ax_steps.set_xlabel("optimizer steps")
    ax_steps.set_ylabel("validation loss (nats per byte)")
    ax_steps.set_title("Validation loss vs steps")
    if all(r.step_ms is not None for r in results):
        ax_time.set_xlabel(
            "training wall-clock (s): steps × median step + refreshes × median "
            "refresh,\ntimed interleaved"
        )
    else:
        ax_time.set_xlabel(
            "training wall-clock (s, evaluation excluded),\nmeasured one run after "
            "another on this machine: load-dependent"
        )
    ax_time.set_title("Validation loss vs wall-clock")
    for ax in (ax_steps, ax_time):
        ax.grid(True, alpha=0.3)
        ax.legend()
    # The untrained model's loss, near $\ln V$, is left out of the y-range.
    trained = [v for r in results for v in r.val_losses[1:]]
    if trained:
        ax_steps.set_ylim(min(trained) - 0.05, max(trained) + 0.05)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)


def write_comparison(
    results: list[RunResult], out: Path, *, title: str = ""
) -> dict[str, Path]:
    r"""Write `compare.{png,csv,md}` and `runs.json` into `out`; return their paths."""
    # `runs.json` holds every run in full: the other three can be made from it again.
    rows = summarize(results)
    paths = dict(
        png=out / "compare.png",
        csv=out / "compare.csv",
        md=out / "compare.md",
        json=out / "runs.json",
    )
    plot(results, paths["png"], title=title)
    write_csv(rows, paths["csv"])
    paths["md"].write_text((f"# {title}\n\n" if title else "") + markdown_table(rows))
    paths["json"].write_text(json.dumps([r.to_dict() for r in results], indent=1))
    return paths
