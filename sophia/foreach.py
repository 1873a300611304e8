r"""
---
title: Sophia, the torch._foreach version
summary: The reference step, done for a whole list of tensors per operation.
---

The [reference](reference.html) updates one tensor at a time: for a model with a few
hundred parameter tensors that is a few thousand small kernel launches per step, and on
a GPU the launches, not the arithmetic, set the pace. PyTorch's `torch._foreach_*`
operations take *lists* of tensors and apply one operation to all of them, launching
one kernel for many tensors. This module is the reference, statement by statement,
rewritten with them; the comments name the line of the reference each call implements.

Two constraints shape it:

* A foreach op needs all its tensors on one device with one dtype, so we first **group**
  the tensors by `(device, dtype)` and run the step once per group.
* There is no Python loop over parameters in the math: every formula is one
  `torch._foreach_*` call per group. (Building the groups and, for half precision, the
  `float32` working copies does visit each tensor once; that is bookkeeping, not math.)

**Agreement with the reference.** The operations and their order are the reference's
exactly. On the CPU, PyTorch evaluates a foreach op by calling the same per-tensor
kernel on each tensor, so the two versions agree **bitwise** there (the tests assert
equality). On a GPU the foreach kernels are separate code that may fuse a multiply and
an add differently; there we promise (and test) $10^{-6}$ relative per element in
`float32`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from .reference import _as_real, _in_range, _is_zero_in


# ## Grouping by device and dtype
#
# `lists` holds parallel lists (params, grads, ...). We return, for each `(device,
# dtype)` of the first list, the same parallel lists restricted to the tensors of that
# kind. A complex tensor is viewed as real here (see the reference), so its group is
# that of its real dtype and every op below applies unchanged.
#
# PyTorch has a private helper for this (`torch.utils._foreach_utils`); its signature
# has changed between releases, and these few lines are easier to read than a pinned
# private API.
def group_by_device_and_dtype(*lists: list[Tensor]) -> dict[tuple, list[list[Tensor]]]:
    r"""Split parallel tensor lists into groups whose first tensors share device and
    dtype."""
    groups: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[] for _ in lists])
    for tensors in zip(*lists):
        key = (tensors[0].device, tensors[0].dtype)
        for column, t in zip(groups[key], tensors):
            column.append(_as_real(t))
    return dict(groups)


# ## Working precision, for a whole list
#
# As in the reference, half-precision tensors are computed in `float32` and rounded once
# on store. For a group of `bfloat16` or `float16` tensors we make `float32` copies
# (one allocation per tensor, freed at the end of the step) and copy the results back
# with one `torch._foreach_copy_`. The fused kernel avoids these copies by converting
# in registers.
def _opmath_list(tensors: list[Tensor]) -> list[Tensor]:
    if tensors and tensors[0].dtype in (torch.float16, torch.bfloat16):
        return [t.float() for t in tensors]
    return tensors


# ## The step
#
# Same arguments as `sophiag_reference`, for tensors that may be on several devices
# and of several dtypes.
def sophiag_foreach(
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
    r"""Take one Sophia step on every tensor of `params`, one foreach op per formula
    per group."""
    if not params:
        return

    # The step counters are scalars, often on the CPU while the parameters are on a
    # GPU: they are one group of their own, one foreach op for all of them.
    # Reference: `step += 1`.
    torch._foreach_add_(state_steps, 1)

    groups = group_by_device_and_dtype(params, grads, exp_avgs, hessians)
    for group_params, group_grads, group_exp_avgs, group_hessians in groups.values():
        # Reference: `grad = -grads[i]` when maximizing.
        if maximize:
            group_grads = torch._foreach_neg(group_grads)

        # Reference: the working copies (`float32` for half precision).
        params_w = _opmath_list(group_params)
        grads_w = _opmath_list(group_grads)
        exp_avgs_w = _opmath_list(group_exp_avgs)
        hessians_w = _opmath_list(group_hessians)

        # Reference: `param_w.mul_(1 - lr * weight_decay)`,
        # $\theta \leftarrow (1 - \eta_t\lambda)\,\theta$ (line 11 of Algorithm 3).
        torch._foreach_mul_(params_w, 1 - lr * weight_decay)

        # Reference: `exp_avg_w.mul_(beta1).add_(grad_w, alpha=1 - beta1)`,
        # $m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t$ (line 6 of Algorithm 3).
        torch._foreach_mul_(exp_avgs_w, beta1)
        torch._foreach_add_(exp_avgs_w, grads_w, alpha=1 - beta1)

        # Reference: `denom = (hessian_w * rho_bs).clamp_(min=...)`, with `rho_bs` and
        # `eps` kept in the working precision's range: $d_t = \max(\rho B h_t,
        # \epsilon)$.
        working = hessians_w[0].dtype
        denoms = torch._foreach_mul(hessians_w, _in_range(rho * bs, working))
        torch._foreach_clamp_min_(denoms, _in_range(eps, working))

        # Reference: `update = (exp_avg_w / denom).clamp_(min=-1, max=1)`,
        # $u_t = \operatorname{clip}(m_t / d_t, 1)$. The denominators are dropped as soon
        # as they are used, so at most two temporaries per tensor are alive at once
        # (the fused kernel keeps everything in registers and needs none).
        updates = torch._foreach_div(exp_avgs_w, denoms)
        del denoms
        torch._foreach_clamp_min_(updates, -1)
        torch._foreach_clamp_max_(updates, 1)

        # Reference: `param_w.add_(update, alpha=-lr)`,
        # $\theta_t = \theta_{t-1} - \eta_t u_t$ (line 12 of Algorithm 3).
        torch._foreach_add_(params_w, updates, alpha=-lr)

        # Reference: round the working copies into storage (half precision only).
        if params_w is not group_params:
            torch._foreach_copy_(group_params, params_w)
            torch._foreach_copy_(group_exp_avgs, exp_avgs_w)


# ## The Hessian EMA
#
# Reference: `hessian_ema_reference` (lines 7–10 of Algorithm 3),
# $h \leftarrow \beta_2 h + (1 - \beta_2)\,\hat g\odot\hat g$ (`square=True`) or
# $h \leftarrow \beta_2 h + (1 - \beta_2)\,\hat h$ (`square=False`).
def hessian_ema_foreach(
    hessians: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: float,
    square: bool,
) -> None:
    r"""Fold one estimate per tensor into `hessians`, one foreach op per formula per
    group."""
    for group_hessians, group_estimates in group_by_device_and_dtype(
        hessians, estimates
    ).values():
        hessians_w = _opmath_list(group_hessians)
        estimates_w = _opmath_list(group_estimates)
        # Reference: `hessian_w.zero_()` where $\beta_2$ rounds to zero, else
        # `hessian_w.mul_(beta2)`.
        if _is_zero_in(beta2, hessians_w[0].dtype):
            torch._foreach_zero_(hessians_w)
        else:
            torch._foreach_mul_(hessians_w, beta2)
        if square:
            torch._foreach_addcmul_(
                hessians_w, estimates_w, estimates_w, value=1 - beta2
            )
        else:
            torch._foreach_add_(hessians_w, estimates_w, alpha=1 - beta2)
        if hessians_w is not group_hessians:
            torch._foreach_copy_(group_hessians, hessians_w)
