r"""
---
title: A first run - the implementations agree on a toy problem
summary: Sophia-G on softmax regression, run by every implementation from the same start with the same samples, compared element by element.
---

`python -m sophia` runs this file. It trains a small softmax-regression model with
Sophia-G as a language model is trained with it (cross-entropy steps, and every $k$
steps a Gauss-Newton-Bartlett refresh on a fresh batch), once per implementation, from
the same initial weights, on the same batches, with the same sampled labels. Then it
compares the final parameters element by element against the
[reference](../reference.html), and prints the table.

The implementations compared:

* `reference`: [`sophia.reference`](../reference.html), one tensor at a time;
* `foreach`: [`sophia.foreach`](../foreach.html), `torch._foreach_*` ops over all
  tensors;
* `fused`: the [fused kernel](../fused.html), here its CPU build (the CUDA source
  compiled as C++; the first run compiles it, about half a minute, then it is cached);
* `authors' formula`: the authors' published update restated below (weight decay,
  momentum, then $\min(|m|/(\rho B h + 10^{-15}), 1)$), the independent check that our
  `SophiaG` is a drop-in replacement for theirs.

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

# Only the package's public pieces, as a user would use them: the implementation is
# chosen with the optimizer's own flags, so the table also tests dispatch.
from ..hessian import gnb_loss
from ..optimizer import SophiaG

# Relative difference per element, against the reference, above which the run fails.
# A tolerance because the authors' $\rho B h + \epsilon$ and our
# $\max(\rho B h, \epsilon)$ can differ in the last bit where $\rho B h$ is tiny, and
# training carries that forward; a wrong formula (a missing $B$, weight decay after
# the update, a bias correction) moves the parameters by orders of magnitude more.
TOLERANCE = 1e-6


# ## The problem
#
# A softmax regression: `n_features` inputs, `n_classes` outputs, labels drawn from a
# random "teacher" model so that the problem has a solution to find. Every batch comes
# from a generator seeded by the step, so every implementation sees the same data.
@dataclass
class Problem:
    r"""A softmax regression with a random teacher: sizes, schedule and seed."""

    # The sizes, the batch (also $B$: one prediction per example), the steps, the
    # Hessian refresh interval $k$, and the seed of everything random.
    n_features: int = 20
    n_classes: int = 5
    batch: int = 64
    steps: int = 200
    k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        # One seeded generator draws the teacher and the initial weights (each `train`
        # clones them). The teacher is scaled up so its labels carry signal; the
        # student starts near zero, its predictions nearly uniform.
        gen = torch.Generator().manual_seed(self.seed)
        self.teacher = torch.randn(self.n_classes, self.n_features, generator=gen) * 2.0
        self.init = [
            torch.randn(self.n_classes, self.n_features, generator=gen) * 0.1,
            torch.zeros(self.n_classes),
        ]

    def batch_at(self, step: int) -> tuple[Tensor, Tensor]:
        r"""The batch of step `step`: inputs, and labels sampled from the teacher."""
        # A generator per batch, seeded from `(seed, step)`, so a step's batch does not
        # depend on what was drawn before; the prime multiplier keeps runs' seeds apart
        # for fewer steps than it. Sampled labels are noisy, as in language modelling.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x = torch.randn(self.batch, self.n_features, generator=gen)
        y = torch.multinomial(
            torch.softmax(x @ self.teacher.T, dim=-1), 1, generator=gen
        ).squeeze(-1)
        return x, y


def logits(params: list[Tensor], x: Tensor) -> Tensor:
    r"""Logits `(batch, n_classes)` for inputs `x`, `(batch, n_features)`."""
    # A function of a parameter list, not an `nn.Module`, so the same tensors can be
    # handed to any optimizer and compared afterwards.
    weight, bias = params
    return x @ weight.T + bias


# ## The authors' update, restated
#
# A minimal optimizer with the authors' formula, written from the update rule, not from
# their file: weight decay, momentum, then the ratio with "$+10^{-15}$" in the
# denominator, clipped above at 1. With $h \ge 0$ it must match ours to `float32`
# rounding (the [reference](../reference.html) shows why).
class AuthorsFormula(torch.optim.Optimizer):
    r"""The authors' published update, for comparison only."""

    # The authors' hyperparameters, with their names; no `eps` (their constant is in
    # `step`), no flags.
    def __init__(self, params, lr, betas, rho, weight_decay):
        super().__init__(
            params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay)
        )

    @torch.no_grad()
    def update_hessian(self) -> None:
        r"""The authors' `update_hessian()`: fold the gradients' squares into the state
        `hessian`."""
        # Algorithm 3, lines 7-10:
        # $h \leftarrow \beta_2 h + (1 - \beta_2)\, \hat g \odot \hat g$, with $\hat g$
        # the gradient of the sampled-label loss the caller has just back-propagated.
        # As in the authors' code, $B$ is not in the stored `hessian`: `step` applies
        # it.
        for group in self.param_groups:
            for p in group["params"]:
                state = self._init(p)
                state["hessian"].mul_(group["betas"][1]).addcmul_(
                    p.grad, p.grad, value=1 - group["betas"][1]
                )

    @torch.no_grad()
    def step(self, bs: float = 5120) -> None:
        r"""The authors' `step(bs=...)`: decay, momentum, and the clipped ratio with
        $+\epsilon$."""
        for group in self.param_groups:
            lr, rho, (beta1, _) = group["lr"], group["rho"], group["betas"]
            for p in group["params"]:
                state = self._init(p)
                # Line 11, decoupled weight decay, first,
                # $\theta \leftarrow (1 - \eta\lambda)\,\theta$; then line 6, the
                # momentum, $m \leftarrow \beta_1 m + (1 - \beta_1)\, g$.
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                # Line 12 in the authors' form:
                # $$\theta \leftarrow \theta - \eta\,\operatorname{sign}(m)\,
                #   \min\!\Big(\frac{|m|}{\rho B h + \epsilon},\ 1\Big).$$
                # No lower clamp: with GNB's $h \ge 0$ the ratio is never negative
                # (with Hutchinson's it could be, hence the reference's
                # $\max(\rho B h, \epsilon)$).
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
# step, and every $k$ steps, *after* that step, the refresh of Algorithm 3's lines
# 7-10 on a fresh batch: labels sampled from the model's own predictions (`gnb_loss`,
# seeded so every implementation draws the same labels), backward, `update_hessian()`.
def train(
    problem: Problem, make_optimizer
) -> tuple[list[Tensor], list[float], SophiaG]:
    r"""Train a copy of `problem.init` with the optimizer `make_optimizer` builds;
    return weights, losses, optimizer."""
    # Fresh leaf tensors, cloned from the shared initial weights, for this run only.
    params = [t.clone().requires_grad_() for t in problem.init]
    opt = make_optimizer(params)
    losses = []
    for step in range(problem.steps):
        x, y = problem.batch_at(step)
        loss = F.cross_entropy(logits(params, x), y)
        # Gradients reset to `None` before each backward, as `zero_grad()` does.
        for p in params:
            p.grad = None
        loss.backward()
        opt.step(bs=problem.batch)
        losses.append(loss.item())
        # At $t = k, 2k, \dots$: a batch no training step sees (its index is past the
        # last step); its gradients serve only `update_hessian()`.
        if step % problem.k == problem.k - 1:
            x_fresh, _ = problem.batch_at(problem.steps + step)
            sampled, _ = gnb_loss(
                logits(params, x_fresh), generator=torch.Generator().manual_seed(step)
            )
            for p in params:
                p.grad = None
            sampled.backward()
            opt.update_hessian()
    # The optimizer too, whose state `win_rate()` reads.
    return [p.detach() for p in params], losses, opt


def max_relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    r"""Largest $|a - b| / |b|$ over all elements, with `b` the reference; computed in
    `float64`."""
    # `float64` adds no rounding of its own. Where the reference holds an exact zero the
    # difference is divided by a tiny floor, so any difference there counts. A NaN is
    # the worst disagreement, and `max(0.0, nan)` is `0.0`: it counts as infinite.
    worst = 0.0
    for x, y in zip(a, b):
        diff = (x.double() - y.double()).abs() / y.double().abs().clamp(min=1e-12)
        worst = max(worst, diff.nan_to_num(nan=math.inf).max().item())
    return worst


# Whether the kernel's CPU build is there: `None` if it is, else the first line of the
# reason (the full message, with the compiler's log, is `load_extension`'s to show).
def _fused_unavailable() -> str | None:
    from .. import fused

    try:
        fused.load_extension("cpu")
    except fused.FusedUnavailableError as error:
        return str(error).splitlines()[0]
    return None


# ## The command
#
# Two options, the number of steps and the seed, so that a run is identified by these
# two numbers; everything else is the `Problem`'s defaults.
MAX_STEPS = 10**9


def _parse(argv: list[str] | None) -> argparse.Namespace:
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
    # With no step there would be nothing to compare, and the batches' seeds
    # (`seed * 1_000_003 + step`) must fit in 64 bits: usage errors, status 2.
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must be in 1..{MAX_STEPS}, got {args.steps}")
    if not -(2**31) <= args.seed < 2**31:
        parser.error(f"--seed must be in -2**31..2**31-1, got {args.seed}")
    return args


# One row per implementation: its first loss (the same for all), its last, and its
# largest relative difference from the reference's final weights; then a row that
# says why the kernel did not run, if it did not. Returns whether any row disagrees.
def _print_table(problem: Problem, results: dict, fused_missing: str | None) -> bool:
    print(
        f"Sophia-G on softmax regression ({problem.n_features} features, "
        f"{problem.n_classes} classes, batch {problem.batch}), {problem.steps} steps, "
        f"GNB refresh every {problem.k} steps"
    )
    print(
        f"{'implementation':<18} {'first loss':>10} {'final loss':>10} "
        f"{'max rel diff vs reference':>26}"
    )
    ref_params = results["reference"][0]
    failed = False
    for name, (params, losses, _) in results.items():
        diff = max_relative_difference(params, ref_params)
        failed |= diff > TOLERANCE
        print(f"{name:<18} {losses[0]:>10.4f} {losses[-1]:>10.4f} {diff:>26.2e}")
    if fused_missing:
        print(f"{'fused':<18} not run: {fused_missing}")
    return failed


def main(argv: list[str] | None = None) -> int:
    r"""Run every implementation on the toy problem, print the agreement table, return
    the exit status."""
    args = _parse(argv)
    problem = Problem(steps=args.steps, seed=args.seed)
    # The authors' names. The learning rate is larger than for a language model: the
    # problem is small and well conditioned, and the loss should fall within few steps.
    hyper = dict(lr=0.05, betas=(0.965, 0.99), rho=0.05, weight_decay=0.01)

    # `foreach=False` / `foreach=True` force the reference and the foreach version
    # (both would be the reference on the CPU otherwise); `fused=True` runs the CPU
    # build, dropped and reported when it cannot be built.
    contenders = {
        "reference": lambda ps: SophiaG(ps, **hyper, foreach=False),
        "foreach": lambda ps: SophiaG(ps, **hyper, foreach=True),
        "fused": lambda ps: SophiaG(ps, **hyper, fused=True),
        "authors' formula": lambda ps: AuthorsFormula(ps, **hyper),
    }
    fused_missing = _fused_unavailable()
    if fused_missing:
        del contenders["fused"]
    results = {name: train(problem, make) for name, make in contenders.items()}

    failed = _print_table(problem, results, fused_missing)
    # The diagnostic the authors log: the fraction of coordinates not clipped.
    win_rate = results["reference"][2].win_rate()
    print(f"clip win rate at the end (reference): {win_rate:.2f}")
    # The exit status makes the command a test: non-zero on disagreement.
    if failed:
        print(
            "DISAGREEMENT: an implementation differs from the reference by more than "
            f"{TOLERANCE:g}"
        )
        return 1
    print(
        f"all implementations agree with the reference to within {TOLERANCE:g} "
        "relative per element"
    )
    return 0


# `python -m sophia.experiments.demo` runs this file; `python -m sophia` runs the same
# `main` through the package's `__main__`.
if __name__ == "__main__":
    sys.exit(main())
