r"""
---
title: A first run - the implementations agree on a toy problem
summary: Sophia-G on softmax regression, run by every implementation from the same start with the same samples, compared element by element.
---

# A first run: the implementations agree

`python -m sophia` runs this file. It trains a small softmax-regression model with
Sophia-G, exactly as a language model is trained with it (cross-entropy steps, and every
$k$ steps a Gauss-Newton-Bartlett refresh on a fresh batch), once per implementation,
from the same initial weights, on the same batches, with the same sampled labels. Then
it compares the final parameters element by element against the
[reference](reference.html), and prints the table.

The implementations compared:

* `reference`: [`sophia.reference`](reference.html), one tensor at a time;
* `foreach`: [`sophia.foreach`](foreach.html), `torch._foreach_*` ops over all tensors;
* `fused`: the [fused kernel](fused.html), here its CPU build (the CUDA source compiled as
  C++; the first run compiles it, about half a minute, then it is cached);
* `authors' formula`: the authors' published update restated in four lines below
  (weight decay, momentum, then $\min(|m|/(\rho B h + 10^{-15}), 1)$), as the
  independent check that our `SophiaG` is a drop-in replacement for theirs.

Where the fused kernel cannot be built (no C++ compiler, no `ninja`), the table says
why and the others still run. The run exits with status 1 if any implementation
disagrees with the reference by more than `TOLERANCE`, so the command doubles as a
smoke test.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# The demo uses only the package's public pieces, as a user would: the estimator's loss
# and the optimizer class. Which implementation runs is chosen with the optimizer's own
# flags, not by calling the step functions directly, so the table also tests dispatch.
from ..hessian import gnb_loss
from ..optimizer import SophiaG

# Relative difference per element, against the reference, above which the run fails.
#
# Why a tolerance at all, when the CPU versions agree bit for bit step by step: the
# authors' formula divides by $\rho B h + \epsilon$ where ours divides by
# $\max(\rho B h, \epsilon)$, which can differ in the last bit where $\rho B h$ is tiny,
# and a training run carries such a difference forward. `TOLERANCE` is far below what a
# wrong formula produces (a missing $B$, weight decay after the update instead of before,
# a bias correction): those change the parameters by orders of magnitude more.
TOLERANCE = 1e-6


# ## The problem
#
# A softmax regression: `n_features` inputs, `n_classes` outputs, labels drawn from a
# random "teacher" model so that the problem has a solution to find. Every batch is
# drawn from a generator seeded by the step number, so every implementation sees the
# same data in the same order.
@dataclass
class Problem:
    r"""A softmax regression with a random teacher: its sizes, its schedule, and its seed."""

    # The fields: the sizes of the model, the batch (also $B$: one prediction per example),
    # the number of steps, the Hessian refresh interval $k$, and the seed of everything
    # random.
    n_features: int = 20
    n_classes: int = 5
    batch: int = 64
    steps: int = 200
    k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        # One seeded generator draws the teacher and the initial weights, so every
        # implementation starts from the same tensors (each `train` clones them). The teacher's
        # weights are scaled up so that its softmax is sharp and the labels carry signal; the
        # student starts near zero, where its predictions are nearly uniform.
        gen = torch.Generator().manual_seed(self.seed)
        self.teacher = torch.randn(self.n_classes, self.n_features, generator=gen) * 2.0
        self.init = [
            torch.randn(self.n_classes, self.n_features, generator=gen) * 0.1,
            torch.zeros(self.n_classes),
        ]

    def batch_at(self, step: int) -> tuple[Tensor, Tensor]:
        r"""The batch of step `step`: inputs, and labels sampled from the teacher's softmax."""
        # A generator per batch, seeded from `(seed, step)`: every call with the same step gives
        # the same batch, whatever was drawn before, so the implementations need not draw in the
        # same order. The multiplier, a prime, keeps the seeds of different runs apart for any
        # step count below it. Labels are sampled, not taken as the teacher's argmax: noisy labels,
        # as in language modelling, where the loss never reaches zero.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x = torch.randn(self.batch, self.n_features, generator=gen)
        y = torch.multinomial(
            torch.softmax(x @ self.teacher.T, dim=-1), 1, generator=gen
        ).squeeze(-1)
        return x, y


def logits(params: list[Tensor], x: Tensor) -> Tensor:
    r"""Logits of shape `(batch, n_classes)` for inputs `x` of shape `(batch, n_features)`."""
    # A plain function of a parameter list, not an `nn.Module`, so the same tensors can be
    # handed to any optimizer and compared afterwards.
    weight, bias = params
    return x @ weight.T + bias


# ## The authors' update, restated
#
# A minimal optimizer with the authors' formula, written from the update rule, not from
# their file: weight decay, momentum, then the ratio with "$+10^{-15}$" in the
# denominator, clipped above at 1. With $h \ge 0$ it must match ours to `float32`
# rounding (the reference module shows why).
class AuthorsFormula(torch.optim.Optimizer):
    r"""The authors' published update, for comparison only."""

    # The authors' hyperparameters, with their names; no `eps` (their constant is written
    # into `step`), no flags.
    def __init__(self, params, lr, betas, rho, weight_decay):
        super().__init__(
            params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay)
        )

    @torch.no_grad()
    def update_hessian(self) -> None:
        r"""The authors' `update_hessian()`: fold the gradients' squares into the state `hessian`."""
        # $h \leftarrow \beta_2 h + (1 - \beta_2)\, \hat g \odot \hat g$, where $\hat g$ is the
        # gradient of the sampled-label loss that the caller has just back-propagated. As in the
        # authors' code, $B$ is not in the stored `hessian`: `step` applies it.
        for group in self.param_groups:
            for p in group["params"]:
                state = self._init(p)
                state["hessian"].mul_(group["betas"][1]).addcmul_(
                    p.grad, p.grad, value=1 - group["betas"][1]
                )

    @torch.no_grad()
    def step(self, bs: float = 5120) -> None:
        r"""The authors' `step(bs=...)`: decay, momentum, and the clipped ratio with $+\epsilon$."""
        for group in self.param_groups:
            lr, rho, (beta1, _) = group["lr"], group["rho"], group["betas"]
            for p in group["params"]:
                state = self._init(p)
                # Decoupled weight decay first, $\theta \leftarrow (1 - \eta\lambda)\,\theta$; then the
                # momentum, $m \leftarrow \beta_1 m + (1 - \beta_1)\, g$.
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                # The authors' form of the clipped step:
                # $$\theta \leftarrow \theta - \eta\,\operatorname{sign}(m)\,\min\!\Big(\frac{|m|}{\rho B h + \epsilon},\ 1\Big).$$
                # The clamp has no lower bound: with $h \ge 0$ the ratio cannot be negative. (With
                # Hutchinson's estimates it could, which is why [the reference](reference.html) uses
                # $\max(\rho B h, \epsilon)$ instead; the GNB estimates of this demo are never negative.)
                ratio = (
                    state["exp_avg"].abs() / (rho * bs * state["hessian"] + 1e-15)
                ).clamp(None, 1)
                p.addcmul_(state["exp_avg"].sign(), ratio, value=-lr)

    # State on first use, zeros, as the authors create it. Their state also has a `step`
    # counter; it does not enter the update, so it is left out.
    def _init(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state


# ## The training loop
#
# The reference recipe in miniature: a cross-entropy step with `bs` = predictions per
# step, and every $k$ steps, *after* that step, a refresh on a fresh batch: sample
# labels from the model's own predictions (`gnb_loss`, seeded so that every
# implementation draws the same labels), back-propagate, `update_hessian()`.
def train(
    problem: Problem, make_optimizer
) -> tuple[list[Tensor], list[float], SophiaG]:
    r"""Train a copy of `problem.init` with the optimizer `make_optimizer` builds; return weights, losses, optimizer."""
    # Fresh leaf tensors, cloned from the shared initial weights, for this run only.
    params = [t.clone().requires_grad_() for t in problem.init]
    opt = make_optimizer(params)
    losses = []
    for step in range(problem.steps):
        x, y = problem.batch_at(step)
        loss = F.cross_entropy(logits(params, x), y)
        # The gradients are reset to `None` before each backward pass, as
        # `zero_grad(set_to_none=True)` does, so that nothing accumulates across passes. `bs`
        # is $B$, the predictions in a training batch.
        for p in params:
            p.grad = None
        loss.backward()
        opt.step(bs=problem.batch)
        losses.append(loss.item())
        # Every $k$ steps, after the step (so at $t = k, 2k, \dots$): a batch no training step
        # sees (its index is past the last training step), labels sampled by `gnb_loss` with a
        # generator seeded by the step, so all implementations draw the same labels. The
        # refresh's gradients are used only by `update_hessian()`; the next step resets them.
        if step % problem.k == problem.k - 1:
            x_fresh, _ = problem.batch_at(problem.steps + step)
            sampled, _ = gnb_loss(
                logits(params, x_fresh), generator=torch.Generator().manual_seed(step)
            )
            for p in params:
                p.grad = None
            sampled.backward()
            opt.update_hessian()
    # The final weights, detached from autograd; the loss of every step; and the optimizer,
    # whose state `win_rate()` reads.
    return [p.detach() for p in params], losses, opt


def max_relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    r"""Largest $|a - b| / |b|$ over all elements, with `b` the reference; computed in `float64`."""
    # In `float64`, so that the comparison adds no rounding of its own to what it measures.
    # The denominator is kept away from zero: where the reference holds an exact zero, the
    # difference is divided by a tiny floor instead, so any difference there counts as a
    # disagreement.
    #
    # A NaN anywhere is the worst disagreement there is, and Python's `max` would drop
    # it (`max(0.0, nan)` is `0.0`): it is counted as infinite.
    worst = 0.0
    for x, y in zip(a, b):
        diff = (x.double() - y.double()).abs() / y.double().abs().clamp(min=1e-12)
        worst = max(worst, diff.nan_to_num(nan=math.inf).max().item())
    return worst


# Whether the kernel's CPU build is there: `None` if it is, else the first line of the
# reason.
def _fused_unavailable() -> str | None:
    from .. import fused

    # The first line of the build error, for the table: the full message, with the
    # compiler's log, is for `sophia.fused.load_extension` to show when asked.
    try:
        fused.load_extension("cpu")
    except fused.FusedUnavailableError as error:
        return str(error).splitlines()[0]
    return None


# ## The command
def main(argv: list[str] | None = None) -> int:
    r"""Run every implementation on the toy problem, print the agreement table, return the exit status."""
    # Two options: the number of steps and the seed. Everything else is the `Problem`'s
    # defaults, so that a run is identified by these two numbers.
    parser = argparse.ArgumentParser(
        prog="python -m sophia",
        description=__doc__.split("summary:")[1].split("---")[0].strip(),
    )
    parser.add_argument(
        "--steps", type=int, default=Problem.steps, help="optimizer steps"
    )
    parser.add_argument(
        "--seed", type=int, default=Problem.seed, help="seed of data, init and samples"
    )
    args = parser.parse_args(argv)
    # `parser.error` prints the usage and exits with status 2, the convention for a bad
    # command line: with no step there would be no loss to print and nothing to compare.
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    # One problem for all contenders: the same teacher, initial weights and batches.
    problem = Problem(steps=args.steps, seed=args.seed)
    # The same hyperparameters for every contender, in the authors' names. The learning
    # rate is larger than for a language model: the problem is small and well conditioned,
    # and the run should show the loss falling within its few steps.
    hyper = dict(lr=0.05, betas=(0.965, 0.99), rho=0.05, weight_decay=0.01)

    # Each contender is a factory, given the fresh parameters of its run. `foreach=False` and
    # `foreach=True` force the reference and the foreach version, which on CPU tensors would
    # otherwise both be the reference; `fused=True` runs the kernel's CPU build.
    contenders = {
        "reference": lambda ps: SophiaG(ps, **hyper, foreach=False),
        "foreach": lambda ps: SophiaG(ps, **hyper, foreach=True),
        "fused": lambda ps: SophiaG(ps, **hyper, fused=True),
        "authors' formula": lambda ps: AuthorsFormula(ps, **hyper),
    }
    # A kernel that cannot be built here is not a failure of the demo: it is dropped from the
    # runs and reported in the table with the reason.
    fused_missing = _fused_unavailable()
    if fused_missing:
        del contenders["fused"]
    # The runs, one after another, from the same start; then the reference's results, the
    # yardstick of the table.
    results = {name: train(problem, make) for name, make in contenders.items()}
    ref_params, ref_losses, ref_opt = results["reference"]

    print(
        f"Sophia-G on softmax regression ({problem.n_features} features, {problem.n_classes} classes, "
        f"batch {problem.batch}), {problem.steps} steps, GNB refresh every {problem.k} steps"
    )
    print(
        f"{'implementation':<18} {'first loss':>10} {'final loss':>10} {'max rel diff vs reference':>26}"
    )
    # One row per implementation: its first training loss (the same for all, from the same
    # start), its last (the same if the runs agree), and its largest relative difference
    # from the reference over every element of the final weights. The reference's own row
    # reads zero.
    failed = False
    for name, (params, losses, _) in results.items():
        diff = max_relative_difference(params, ref_params)
        failed |= diff > TOLERANCE
        print(f"{name:<18} {losses[0]:>10.4f} {losses[-1]:>10.4f} {diff:>26.2e}")
    # A kernel that was not run gets a row that says why, so a missing row is never silent.
    if fused_missing:
        print(f"{'fused':<18} not run: {fused_missing}")
    # The diagnostic the authors log: the fraction of coordinates not clipped at the end.
    print(f"clip win rate at the end (reference): {ref_opt.win_rate():.2f}")
    # The exit status makes the command a test: non-zero on disagreement.
    if failed:
        print(
            f"DISAGREEMENT: an implementation differs from the reference by more than {TOLERANCE:g}"
        )
        return 1
    print(
        f"all implementations agree with the reference to within {TOLERANCE:g} relative per element"
    )
    return 0


# `python -m sophia.experiments.demo` runs this file directly; `python -m sophia` runs the same
# `main` through the package's `__main__`.
if __name__ == "__main__":
    sys.exit(main())
