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
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .hessian import gnb_loss
from .optimizer import SophiaG

# Relative difference per element, against the reference, above which the run fails.
TOLERANCE = 1e-6


# ## The problem
#
# A softmax regression: `n_features` inputs, `n_classes` outputs, labels drawn from a
# random "teacher" model so that the problem has a solution to find. Every batch is
# drawn from a generator seeded by the step number, so every implementation sees the
# same data in the same order.
@dataclass
class Problem:
    n_features: int = 20
    n_classes: int = 5
    batch: int = 64
    steps: int = 200
    k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self.teacher = torch.randn(self.n_classes, self.n_features, generator=gen) * 2.0
        self.init = [
            torch.randn(self.n_classes, self.n_features, generator=gen) * 0.1,
            torch.zeros(self.n_classes),
        ]

    def batch_at(self, step: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x = torch.randn(self.batch, self.n_features, generator=gen)
        y = torch.multinomial(torch.softmax(x @ self.teacher.T, dim=-1), 1, generator=gen).squeeze(-1)
        return x, y


def logits(params: list[Tensor], x: Tensor) -> Tensor:
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

    def __init__(self, params, lr, betas, rho, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay))

    @torch.no_grad()
    def update_hessian(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self._init(p)
                state["hessian"].mul_(group["betas"][1]).addcmul_(p.grad, p.grad, value=1 - group["betas"][1])

    @torch.no_grad()
    def step(self, bs: float = 5120) -> None:
        for group in self.param_groups:
            lr, rho, (beta1, _) = group["lr"], group["rho"], group["betas"]
            for p in group["params"]:
                state = self._init(p)
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (state["exp_avg"].abs() / (rho * bs * state["hessian"] + 1e-15)).clamp(None, 1)
                p.addcmul_(state["exp_avg"].sign(), ratio, value=-lr)

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
def train(problem: Problem, make_optimizer) -> tuple[list[Tensor], list[float], SophiaG]:
    params = [t.clone().requires_grad_() for t in problem.init]
    opt = make_optimizer(params)
    losses = []
    for step in range(problem.steps):
        x, y = problem.batch_at(step)
        loss = F.cross_entropy(logits(params, x), y)
        for p in params:
            p.grad = None
        loss.backward()
        opt.step(bs=problem.batch)
        losses.append(loss.item())
        if step % problem.k == problem.k - 1:
            x_fresh, _ = problem.batch_at(problem.steps + step)
            sampled, _ = gnb_loss(logits(params, x_fresh), generator=torch.Generator().manual_seed(step))
            for p in params:
                p.grad = None
            sampled.backward()
            opt.update_hessian()
    return [p.detach() for p in params], losses, opt


def max_relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        diff = (x.double() - y.double()).abs() / y.double().abs().clamp(min=1e-12)
        worst = max(worst, diff.max().item())
    return worst


def _fused_unavailable() -> str | None:
    from . import fused

    try:
        fused.load_extension("cpu")
    except fused.FusedUnavailableError as error:
        return str(error).splitlines()[0]
    return None


# ## The command
def main(argv: list[str] | None = None) -> int:
    r"""Run every implementation on the toy problem, print the agreement table, return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m sophia", description=__doc__.split("---")[1].strip())
    parser.add_argument("--steps", type=int, default=Problem.steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=Problem.seed, help="seed of data, init and samples")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    problem = Problem(steps=args.steps, seed=args.seed)
    hyper = dict(lr=0.05, betas=(0.965, 0.99), rho=0.05, weight_decay=0.01)

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
    ref_params, ref_losses, ref_opt = results["reference"]

    print(
        f"Sophia-G on softmax regression ({problem.n_features} features, {problem.n_classes} classes, "
        f"batch {problem.batch}), {problem.steps} steps, GNB refresh every {problem.k} steps"
    )
    print(f"{'implementation':<18} {'first loss':>10} {'final loss':>10} {'max rel diff vs reference':>26}")
    failed = False
    for name, (params, losses, _) in results.items():
        diff = max_relative_difference(params, ref_params)
        failed |= diff > TOLERANCE
        print(f"{name:<18} {losses[0]:>10.4f} {losses[-1]:>10.4f} {diff:>26.2e}")
    if fused_missing:
        print(f"{'fused':<18} not run: {fused_missing}")
    print(f"clip win rate at the end (reference): {ref_opt.win_rate():.2f}")
    if failed:
        print(f"DISAGREEMENT: an implementation differs from the reference by more than {TOLERANCE:g}")
        return 1
    print(f"all implementations agree with the reference to within {TOLERANCE:g} relative per element")
    return 0


if __name__ == "__main__":
    sys.exit(main())
