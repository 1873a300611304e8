r"""
---
title: Sophia, the reference implementation
summary: One tensor at a time, one line of code per line of the paper's Algorithm 3.
---

This module is the *specification* of this package. It updates one parameter tensor at
a time, and every statement in its loop is one line of Algorithm 3 of
[Liu et al., *Sophia*](https://arxiv.org/abs/2305.14342). The
[`torch._foreach` version](foreach.html) and the fused CUDA kernel do the same
operations in the same order with the same names, and the tests compare them to this
file. This file itself is tested against the math: hand-computed two-element cases and
exact Hessians of quadratics.

The optimizer class, [`SophiaG`](optimizer.html), does the bookkeeping (state, parameter
groups, checks on the inputs) and calls the functions here:

* `sophiag_reference` takes one step (lines 6, 11 and 12 of Algorithm 3);
* `hessian_ema_reference` folds a fresh estimate $\hat h_t$ of the Hessian diagonal into
  its moving average (lines 7–10), every $k$ steps;
* `unclipped_count_reference` counts the coordinates the clip leaves alone, for the
  optimizer's `win_rate()`.

## Notation

| symbol | meaning | code name |
|---|---|---|
| $\theta_t$ | parameters after step $t$ | `param` |
| $g_t$ | minibatch gradient $\nabla L_t(\theta_{t-1})$ | `grad` |
| $m_t$ | EMA of gradients, rate $\beta_1$ | `exp_avg` |
| $\hat h_t$ | one stochastic estimate of the Hessian diagonal | `estimate` |
| $h_t$ | EMA of the estimates, rate $\beta_2$, refreshed every $k$ steps | `hessian` (times `bs`) |
| $\eta_t$ | learning rate, after any schedule | `lr` |
| $\lambda$ | decoupled weight decay | `weight_decay` |
| $\rho$ | how many "Newton units" one step may move before clipping | `rho` |
| $B$ | number of predictions in the batch | `bs` |
| $\epsilon$ | guard against division by zero | `eps` |
"""

from __future__ import annotations

import torch
from torch import Tensor


# ## Working precision
#
# Half-precision tensors (`bfloat16`, `float16`) are stored as they are, but every
# formula below is evaluated in `float32` and the result is rounded once, when it is
# stored. Two reasons. First, $\epsilon = 10^{-15}$ is zero in `float16` (its
# smallest positive number is about $6\times10^{-8}$), and $0/0$ is a NaN. Second,
# rounding each intermediate to 8 bits of mantissa, as a chain of half-precision
# in-place ops would, loses most of the ratio $m/(\rho h)$ before it is clipped. The
# fused kernel does the same in registers ("opmath"), so the three implementations
# round at the same places.
#
# `float32` and `float64` tensors are their own working copy: `_opmath` returns the
# tensor itself, so the in-place ops below write straight into the parameter and the
# state, with no copy.
def _opmath(t: Tensor) -> Tensor:
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


# After the math, a working copy that is not the tensor itself (half precision) is
# rounded into storage, once.
def _store(t: Tensor, working: Tensor) -> None:
    if working.dtype != _as_real(t).dtype:
        _as_real(t).copy_(working)


# ## Complex parameters
#
# A complex parameter $z = x + iy$ is two real parameters, and Sophia treats it as
# such: we optimize the pair $(x, y)$, so the curvature estimate for each is the square
# of *its own* gradient component, $\partial_x L^2$ and $\partial_y L^2$. The authors'
# code squares the complex gradient instead, $g \cdot g = (\partial_x L)^2 -
# (\partial_y L)^2 + 2i\,\partial_x L\,\partial_y L$, which is not a curvature at all
# (its real part can be negative). `torch.view_as_real` turns a complex tensor of
# shape `(...)` into a real one of shape `(..., 2)` that shares its memory, so every
# update below applies unchanged.
def _as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


# ## Numbers the working precision can hold
#
# $\rho B$ and $\epsilon$ are Python numbers, rounded to the working precision when
# they meet a tensor. A product $\rho B$ beyond the dtype's largest value would round
# to $\infty$, and where $h = 0$ (every coordinate before the first refresh) $0 \cdot
# \infty$ is a NaN; one that rounds to zero meets an infinite $h$ the same way, and an
# $\epsilon$ that rounds to zero gives $0 / 0$. So each is kept within the dtype's
# positive finite range: the largest value for one above it, the smallest normal one
# for one that would round to zero. Any other number is left exactly as it is, so this
# changes nothing for ordinary values. (A coordinate with $h > 0$ gets a zero step
# either way: $m$ over a denominator at least $h$ times the largest value.)
def _in_range(value: float, dtype: torch.dtype) -> float:
    finfo = torch.finfo(dtype)
    if value > finfo.max:
        return finfo.max
    if _is_zero_in(value, dtype):
        return finfo.tiny
    return value


# ## The step: lines 6, 11 and 12 of Algorithm 3
#
# The lists hold, at the same index, one parameter tensor and its gradient, momentum,
# Hessian EMA and step counter. The hyperparameters are those of the parameter group.
#
# `bs` is the reference code's convention, which we keep so that our optimizer is a
# drop-in replacement: the state `hessian` stores the EMA of $g \odot g$ for the
# *sampled-label* gradient $\hat g$, and the Gauss-Newton-Bartlett estimate is
# $\hat h = B\, \hat g \odot \hat g$. So the paper's $h_t$ is `bs * hessian`, and the
# factor $B$ is applied here, in the step, instead of in the estimator. For an estimate
# that is already the Hessian diagonal (Hutchinson's), pass `bs=1`.
def sophiag_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    bs: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    r"""Take one Sophia step on each tensor of `params`, one tensor at a time, in
    place."""
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        hessian = hessians[i]
        step = state_steps[i]

        # View complex tensors as pairs of reals (see above), then take the working
        # copies in `float32` for half precision (for `float32`/`float64` these are
        # the tensors themselves).
        param_w = _opmath(_as_real(param))
        grad_w = _opmath(_as_real(grad))
        exp_avg_w = _opmath(_as_real(exp_avg))
        hessian_w = _opmath(_as_real(hessian))

        # Count the step: $t \leftarrow t + 1$. Algorithm 3 has no bias correction,
        # so $t$ is only bookkeeping (and tells the Hessian refresh schedule when to
        # run, if the caller asks it).
        step += 1

        # Decoupled weight decay (line 11 of Algorithm 3):
        # $$\theta \leftarrow \theta - \eta_t \lambda \theta = (1 - \eta_t\lambda)\,\theta.$$
        # It is applied before the update and is not clipped, as in AdamW. (The paper
        # decays after the momentum, line 6; the two touch different tensors, so the
        # order does not matter, and this is the authors' code's order.)
        param_w.mul_(1 - lr * weight_decay)

        # Momentum (line 6 of Algorithm 3):
        # $$m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, g_t.$$
        # No bias correction: until $m$ has warmed up, the clip below decides the step
        # anyway.
        exp_avg_w.mul_(beta1).add_(grad_w, alpha=1 - beta1)

        # The preconditioner, with the guard:
        # $$d_t = \max(\rho\, B\, h_t,\ \epsilon).$$
        # `rho * bs` is a Python number (kept in the working precision's range, above),
        # so this is one multiply per element. The
        # $\max$ is what makes Hutchinson's estimates safe: they can be negative (the
        # loss is not convex), and a negative $h$ would flip the sign of the step and
        # send it *uphill*. With the $\max$, $h \le 0$ gives $d = \epsilon$, the ratio
        # below is huge, and the clip turns the step into a plain sign-of-momentum
        # step of size $\eta$: safe, if not clever.
        rho_bs = _in_range(rho * bs, hessian_w.dtype)
        denom = (hessian_w * rho_bs).clamp_(min=_in_range(eps, hessian_w.dtype))

        # The clipped Newton step, per coordinate:
        # $$u_t = \operatorname{clip}\!\left(\frac{m_t}{d_t},\ 1\right) \in [-1, 1],
        #   \qquad \operatorname{clip}(z, 1) = \max(\min(z, 1), -1).$$
        # Where the estimated curvature is small (or negative) the Newton step
        # $m/(\rho B h)$ would be large, and the clip caps it at one unit: this is what
        # guards Sophia against flat directions, negative curvature and stale
        # estimates. (The authors' code writes the same thing as
        # $\operatorname{sign}(m)\min(|m|/d, 1)$; the two are equal bit for bit, since
        # $|m|/d = |m/d|$ and multiplying by $\pm 1$ is exact, and this form needs two
        # temporary tensors instead of four.)
        update = (exp_avg_w / denom).clamp_(min=-1, max=1)

        # The step (line 12 of Algorithm 3):
        # $$\theta_t = \theta_{t-1} - \eta_t\, u_t
        #   = \theta_{t-1} - \eta_t \operatorname{clip}\!\left(\frac{m_t}{\max(\rho B h_t, \epsilon)}, 1\right).$$
        # Every coordinate moves by at most $\eta_t$ (plus the weight decay).
        param_w.add_(update, alpha=-lr)

        # For half precision, round the working copies into storage, once.
        _store(param, param_w)
        _store(exp_avg, exp_avg_w)


# ## Why $\max(\rho B h, \epsilon)$ is the same rule as the others
#
# Three ways of writing line 12 are in circulation. They are the same update.
#
# **The reference code** writes
# $\theta \leftarrow \theta - \eta\,\operatorname{sign}(m)\min\!\big(|m| / (\rho B h + 10^{-15}),\,1\big)$.
# For $h \ge 0$, $\rho B h + \epsilon$ and $\max(\rho B h, \epsilon)$ differ by at most
# $\epsilon$:
# \begin{align}
#   \max(a, \epsilon) \;\le\; a + \epsilon \;\le\; 2\max(a, \epsilon) \qquad (a \ge 0),
# \end{align}
# and where $a = \rho B h \gg \epsilon$ (every coordinate that has seen any curvature)
# the two are equal to within a relative $\epsilon / a$, far below `float32` rounding.
# Where $a \lesssim \epsilon$ both ratios are about $|m|/\epsilon$, which is clipped to 1
# unless $|m| < \epsilon$, i.e. unless the momentum is zero for all practical purposes.
# For $h < 0$ the two differ: $\rho B h + \epsilon$ is negative, the ratio is negative,
# $\min(\cdot, 1)$ does not clip it, and the step goes uphill by an unbounded amount.
# That is why this file uses the $\max$.
#
# **The first version of the paper** writes
# $\theta \leftarrow \theta - \eta'\operatorname{clip}\!\big(m/\max(h, \epsilon'),\ \rho'\big)$
# with $\operatorname{clip}(z, \rho') = \max(\min(z, \rho'), -\rho')$. Factor $\rho'$ out
# of the clip, $\operatorname{clip}(z, \rho') = \rho' \operatorname{clip}(z/\rho', 1)$, and
# move it into the $\max$, $\rho'\max(h, \epsilon') = \max(\rho' h, \rho'\epsilon')$:
# \begin{align}
#   \eta' \operatorname{clip}\!\Big(\frac{m}{\max(h, \epsilon')}, \rho'\Big)
#   &= \eta' \rho' \operatorname{clip}\!\Big(\frac{m}{\rho' \max(h, \epsilon')}, 1\Big) \\
#   &= \eta \operatorname{clip}\!\Big(\frac{m}{\max(\rho h, \epsilon)}, 1\Big)
#   \quad\text{with } \eta = \rho'\eta',\ \rho = \rho',\ \epsilon = \rho'\epsilon'.
# \end{align}
# So the old $(\eta', \rho')$ and the new $(\eta, \rho)$ describe the same optimizer: the
# old clip threshold becomes the new $\rho$, and the new learning rate $\eta = \rho'\eta'$
# is the largest step a coordinate can take.


# ## The Hessian EMA: lines 7–10 of Algorithm 3
#
# Every $k$ steps the caller computes a fresh estimate $\hat h_t$ and we fold it in:
# $$h_t = \beta_2 h_{t-k} + (1 - \beta_2)\, \hat h_t.$$
# Between refreshes $h_t = h_{t-1}$: nothing to do.
#
# Two kinds of estimate arrive here. With `square=True`, `estimates` holds the
# gradients $\hat g$ of the sampled-label loss, and the estimate is $\hat g \odot \hat g$
# (the Gauss-Newton-Bartlett estimate without its factor $B$, which `bs` applies in the
# step, as the reference code does). With `square=False`, `estimates` holds
# $\hat h$ itself, e.g. Hutchinson's $u \odot (Hu)$.
def _is_zero_in(value: float, dtype: torch.dtype) -> bool:
    return torch.tensor(value, dtype=dtype).item() == 0


def hessian_ema_reference(
    hessians: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: float,
    square: bool,
) -> None:
    r"""Fold one Hessian-diagonal estimate per tensor into `hessians`, one tensor at a
    time."""
    for hessian, estimate in zip(hessians, estimates):
        hessian_w = _opmath(_as_real(hessian))
        estimate_w = _opmath(_as_real(estimate))

        # $$h \leftarrow \beta_2 h + (1 - \beta_2)\,\hat g \odot \hat g \quad\text{or}\quad
        #   h \leftarrow \beta_2 h + (1 - \beta_2)\,\hat h.$$
        # Where $\beta_2$ is zero in the working precision the old $h$ is dropped, not
        # multiplied by zero: an $h$ that overflowed to $\infty$ would give
        # $0 \cdot \infty = \mathrm{NaN}$.
        if _is_zero_in(beta2, hessian_w.dtype):
            hessian_w.zero_()
        else:
            hessian_w.mul_(beta2)
        if square:
            hessian_w.addcmul_(estimate_w, estimate_w, value=1 - beta2)
        else:
            hessian_w.add_(estimate_w, alpha=1 - beta2)

        _store(hessian, hessian_w)


# ## The clip win rate
#
# The reference training loop logs the fraction of coordinates that are *not*
# clipped, $|m| < \rho B h$: the coordinates where Sophia takes a true (scaled) Newton
# step instead of a sign step. The reference README tunes $\rho$ so that this stays
# between 0.1 and 0.5. We count with the same guard as the step,
# $|m| < \max(\rho B h, \epsilon)$: the coordinates whose step is not clipped.
def unclipped_count_reference(
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    rho: float,
    bs: float,
    eps: float,
) -> tuple[int, int]:
    r"""Return (number of coordinates with $|m| < \max(\rho B h, \epsilon)$, number of
    coordinates)."""
    unclipped, total = 0, 0
    for exp_avg, hessian in zip(exp_avgs, hessians):
        m = _opmath(_as_real(exp_avg))
        h = _opmath(_as_real(hessian))
        denom = (h * _in_range(rho * bs, h.dtype)).clamp_(min=_in_range(eps, h.dtype))
        unclipped += int((m.abs() < denom).sum())
        total += m.numel()
    return unclipped, total
