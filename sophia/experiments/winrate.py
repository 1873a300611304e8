r"""
---
title: Why the win rate is what it is
summary: The measurements behind the results page's win-rate explanation, how much of it is fill-in, how much the curvature's scale, how much Hutchinson's noise; one command, one JSON file.
---

The **win rate** is the fraction of coordinates whose step is *not* clipped,
$\lvert m \rvert < \rho B h$ (`opt.win_rate()`). The authors tune $\rho$ to keep it
in 0.1–0.5; on our small GPT Sophia-G's sits near 0.03 and Sophia-H's (at
$\rho = 0.01$) near a quarter, and neither number means what it seems to. This module measures why, and
`python -m sophia.experiments.winrate --out FILE` writes every figure to one JSON file,
the one the [results](../../results.md#why-the-win-rate-is-low) and
[hyperparameters](../../hyperparameters.md#rho-and-the-win-rate) pages are generated
from:

1. **Fill-in.** $h$ has no bias correction: after $r$ refreshes from $h = 0$ it holds
   $1 - \beta_2^r$ of the estimate's size. Averaged over a run's refreshes this is
   much less than its value at the end.
2. **A bias-corrected $h$.** The same Sophia-G run with $\rho_r = \rho / (1 -
   \beta_2^r)$ after the $r$-th refresh, which clips exactly as an $h$ divided by $1 -
   \beta_2^r$ would: the win rate with the fill-in removed, and the loss it gives.
3. **Batch size.** $B$ enters as $\rho B h$ and $h$ estimates $\hat g \odot \hat g$
   of a mean over $B$ predictions, so the product should not depend on $B$: three
   batch sizes check it.
4. **Sophia-H's $h$.** At the end of a Sophia-H run: how many coordinates of its $h$
   are negative, $\sum_i \lvert h_i \rvert$ against $\sum_i h_i$, and the curvature's
   scale from 30 fresh Hutchinson estimates and 30 fresh Gauss-Newton-Bartlett
   estimates at the same weights.

Each run is the training loop's, step for step (the same
[`train_step`](train.html#one-step), [`refresh_hessian`](train.html#the-hessian-refresh),
seeds and batches, one thread), without its tracking, so that the optimizer and the
model are at hand afterwards; a test checks that it gives `train`'s losses and win
rates exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..hessian import gnb_loss, hutchinson
from ..reference import unclipped_count_reference
from .config import REFRESHING, TrainConfig, parse_device
from .data import Corpus, load_corpus
from .train import (
    _build_model,
    _generators,
    evaluate,
    make_optimizer,
    refresh_hessian,
    train_batch,
    train_step,
)

# Fresh estimates per estimator in part 4, each from its own batch and probe.
PROBES = 30

# Sequences per step in part 3: $B$ = 256, 1024 (the default) and 4096 predictions.
BATCH_SIZES = (4, 16, 64)


# ## A run with the optimizer at hand
#
# The loop of [`train`](train.html#the-training-loop) without evaluations in between
# (they touch neither the weights nor the random streams), tracking or checkpoints.
# `on_refresh(opt, r)` runs after the $r$-th refresh, before its win rate is read.
@dataclasses.dataclass
class Run:
    r"""A finished run: its model, optimizer, random streams and what it measured."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generators: dict[str, torch.Generator]
    win_rates: list[float]
    final_val_loss: float


def run(
    config: TrainConfig,
    corpus: Corpus,
    *,
    on_refresh: Callable[[torch.optim.Optimizer, int], None] | None = None,
) -> Run:
    r"""Train as `train(config)` does and return the model and optimizer too."""
    device = parse_device(config.device)
    gens = _generators(config.seed, device)
    model = _build_model(config, gens, device)
    opt = make_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    k = config.hess_interval
    win_rates: list[float] = []

    def batch(stream: str) -> tuple[Tensor, Tensor]:
        return train_batch(corpus, config, gens[stream], device)

    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        train_step(model, opt, params, batch("train"), config)
        if config.optimizer in REFRESHING and step % k == k - 1:
            refresh_hessian(
                model, opt, params, batch("hessian"), config, gens["samples"]
            )
            if on_refresh is not None:
                on_refresh(opt, len(win_rates) + 1)
            win_rates.append(opt.win_rate())
    return Run(model, opt, gens, win_rates, evaluate(model, corpus, config, device))


# ## 1. Fill-in
#
# With $h_0 = 0$ and $h_r = \beta_2 h_{r-1} + (1 - \beta_2) \hat h_r$, an estimate of
# constant size $\bar h$ gives $\mathbb{E}[h_r] = (1 - \beta_2^r) \bar h$. The win
# rate reported for a run is the mean over its refreshes, so the fill-in that matters
# is the mean of $1 - \beta_2^r$ over $r = 1..R$, not its last value.
def fill_in(beta2: float, refreshes: int) -> dict[str, float]:
    r"""The share of its size $h$ holds after the last refresh, and on average."""
    shares = [1 - beta2**r for r in range(1, refreshes + 1)]
    return dict(refreshes=refreshes, final=shares[-1], mean=statistics.fmean(shares))


# ## 2. A bias-corrected $h$
#
# $\lvert m \rvert < \rho B \, h / (1 - \beta_2^r)$ is $\lvert m \rvert < \rho_r B h$
# with $\rho_r = \rho / (1 - \beta_2^r)$, and the step $m / (\rho B h / (1 -
# \beta_2^r))$ is the same too: setting $\rho_r$ in every group after the $r$-th
# refresh is Sophia with a bias-corrected $h$, with no change to the optimizer.
def bias_corrected(rho: float, beta2: float) -> Callable:
    r"""An `on_refresh` that sets $\rho_r = \rho / (1 - \beta_2^r)$."""

    def set_rho(opt: torch.optim.Optimizer, r: int) -> None:
        for group in opt.param_groups:
            group["rho"] = rho / (1 - beta2**r)

    return set_rho


def _summary(result: Run, config: TrainConfig) -> dict[str, Any]:
    return dict(
        batch_size=config.batch_size,
        tokens_per_step=config.tokens_per_step,
        final_val_loss=result.final_val_loss,
        win_rate_mean=statistics.fmean(result.win_rates),
        win_rate_last=result.win_rates[-1],
    )


# ## 4. Sophia-H's $h$, and the curvature's scale
#
# The concatenation of one state entry (`"hessian"`, `"exp_avg"`) of every parameter.
def _state(opt: torch.optim.Optimizer, key: str) -> Tensor:
    return torch.cat(
        [opt.state[p][key].flatten() for g in opt.param_groups for p in g["params"]]
    )


# The mean of `n` fresh estimates at the run's final weights, each on its own batch
# from the run's refresh stream: Hutchinson's $u \odot (\nabla^2 L\, u)$ of the mean
# loss (`"hutchinson"`), or Gauss-Newton-Bartlett's $B\, \hat g \odot \hat g$
# (`"gnb"`), unclipped, so that both estimate a diagonal of the mean loss's curvature
# (the [Hessian and the Gauss-Newton matrix](../hessian.html#bartletts-identities)).
def fresh_estimate(result: Run, config: TrainConfig, corpus: Corpus, kind: str, n: int):
    r"""The mean of `n` fresh estimates of the curvature diagonal, flattened."""
    model, gens = result.model, result.generators
    device = parse_device(config.device)
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params))
    for _ in range(n):
        x, y = train_batch(corpus, config, gens["hessian"], device)
        if kind == "hutchinson":
            with sdpa_kernel(SDPBackend.MATH):
                _, loss = model(x, y)
            estimate = hutchinson(loss, params, generator=gens["samples"])
        else:
            logits, _ = model(x)
            loss, bs = gnb_loss(logits, generator=gens["samples"])
            grads = torch.autograd.grad(loss, params)
            estimate = [bs * g * g for g in grads]
        total += torch.cat([e.detach().flatten().cpu() for e in estimate])
    return total / n


def sophiah_curvature(
    config: TrainConfig, corpus: Corpus, probes: int = PROBES
) -> dict[str, Any]:
    r"""Sophia-H's $h$ at the end of a run against fresh estimates at its weights."""
    result = run(config, corpus)
    h, m = _state(result.optimizer, "hessian"), _state(result.optimizer, "exp_avg")
    # Which of the coordinates with $h > 0$ win, by the optimizer's own count,
    # $\lvert m \rvert < \max(\rho h, \epsilon)$ (`bs=1`); a negative $h$ never does,
    # since its bound is $\epsilon$. Every group has the same $\rho$ and $\epsilon$.
    group = result.optimizer.param_groups[0]
    positive = h > 0
    wins, total = unclipped_count_reference(
        [m[positive]], [h[positive]], rho=group["rho"], bs=1, eps=group["eps"]
    )
    hutch = fresh_estimate(result, config, corpus, "hutchinson", probes)
    gnb = fresh_estimate(result, config, corpus, "gnb", probes)
    return dict(
        final_val_loss=result.final_val_loss,
        win_rate_mean=statistics.fmean(result.win_rates),
        win_rate_last=result.win_rates[-1],
        coordinates=h.numel(),
        h_negative_share=float((h < 0).float().mean()),
        h_sum=float(h.sum()),
        h_abs_sum=float(h.abs().sum()),
        wins_among_positive=wins / total,
        probes=probes,
        hutchinson_sum=float(hutch.sum()),
        hutchinson_negative_share=float((hutch < 0).float().mean()),
        gnb_sum=float(gnb.sum()),
    )


# ## All four
#
# Every run uses seed 0 and the default configuration of its optimizer (the one
# `python -m sophia.train compare` runs), with one torch thread on the CPU.
def measure(
    base: TrainConfig, corpus: Corpus, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    r"""Every measurement of the module, as a JSON-ready dictionary."""
    g = dataclasses.replace(base, optimizer="sophiag")
    hyper = g.hyper()
    beta2, rho = hyper["betas"][1], hyper["rho"]
    out: dict[str, Any] = dict(
        config=dict(
            steps=g.steps,
            hess_interval=g.hess_interval,
            seed=g.seed,
            sophiag=hyper,
            sophiah=dataclasses.replace(base, optimizer="sophiah").hyper(),
        ),
        fill_in=fill_in(beta2, g.steps // g.hess_interval),
    )
    log("Sophia-G at each batch size ...")
    out["batch_sizes"] = []
    for size in BATCH_SIZES:
        config = dataclasses.replace(g, batch_size=size)
        out["batch_sizes"].append(_summary(run(config, corpus), config))
        if size == g.batch_size:
            out["sophiag"] = out["batch_sizes"][-1]
    log("Sophia-G with a bias-corrected h ...")
    out["sophiag_bias_corrected"] = _summary(
        run(g, corpus, on_refresh=bias_corrected(rho, beta2)), g
    )
    log("Sophia-H, then fresh estimates at its final weights ...")
    out["sophiah"] = sophiah_curvature(
        dataclasses.replace(base, optimizer="sophiah"), corpus
    )
    return out


def main(argv: list[str] | None = None) -> int:
    r"""Measure and write the JSON file; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sophia.experiments.winrate",
        description="Measure why the clip win rate is what it is (about 5 minutes "
        "on two CPU cores) and write the figures as JSON.",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the JSON file")
    parser.add_argument(
        "--steps", type=int, default=TrainConfig().steps, help="default %(default)s"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"{parser.prog}: error: no folder {out.parent}", file=sys.stderr)
        return 2
    # One thread, as `python -m sophia.train`: the same losses on every machine.
    torch.set_num_threads(1)
    base = TrainConfig(steps=args.steps, verbose=False)
    corpus = load_corpus(base.data)
    result = measure(base, corpus, log=lambda s: print(s, file=sys.stderr))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
