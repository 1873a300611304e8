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
  `float32` working copies does visit each tensor once; that is bookkeeping, not math.
  So does a step that the device may skip: PyTorch has no foreach select.)

**Agreement with the reference.** The operations are the reference's, in its order on
each tensor (the decay of $\theta$ comes just before $\theta$'s step: it touches no
other tensor, so nothing can tell). On the CPU, PyTorch evaluates a foreach op by
calling the same per-tensor kernel on each tensor, so the two versions agree
**bitwise** there (the tests assert equality). On a GPU the foreach kernels are
separate code that may fuse a multiply and an add differently; there we promise (and
test) $10^{-6}$ relative per element in `float32`.
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


# ## Counting steps
#
# Reference: `step += 1`. With a flag `found_inf` (a step the device may skip, below,
# and the fused kernel's), the increment is $[\text{found\_inf} = 0]$, computed where
# the flag is, then copied to each `(device, dtype)` of the counters: only a copy from
# a GPU to the CPU waits.
def count_steps(state_steps: list[Tensor], found_inf: Tensor | None) -> None:
    r"""Add one to every counter of `state_steps`, or, with `found_inf`, one where the
    flag is zero, without reading it on the host."""
    if found_inf is None:
        torch._foreach_add_(state_steps, 1)
        return
    not_skipped = found_inf.reshape(()) == 0
    by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
    for step in state_steps:
        by_kind[(step.device, step.dtype)].append(step)
    for (device, dtype), steps in by_kind.items():
        increment = not_skipped.to(device=device, dtype=dtype)
        torch._foreach_add_(steps, [increment] * len(steps))


# ## A step the device may skip
#
# With `found_inf` (a one-element flag on the tensors' device, non-zero to skip: the
# optimizer's [non-finite check](nonfinite.html#on-the-device)) the step must change
# nothing where the flag is set, and be the unflagged step bit for bit where it is
# zero, without the host reading the flag (a wait for the device). So the new $\theta$
# and $m$ are computed out of place, by the same ops in the same order, and then
# selected per tensor with `torch.where`: a select never lets a NaN of the new values
# through, where a mask would ($\mathrm{NaN} \cdot 0 = \mathrm{NaN}$). The
# half-precision working copies are scratch already: their new values are computed in
# place and selected as they are rounded into storage. The new $m$ is stored before the
# new $\theta$ is made, so no more temporaries are alive at once than without a flag;
# the cost is one more pass over $\theta$ and $m$ (the select reads the old and the new
# values) and two launches per tensor.
def _scaled(
    working: list[Tensor], storage: list[Tensor], factor: float, skip: Tensor | None
) -> list[Tensor]:
    if skip is not None and working is storage:
        return torch._foreach_mul(working, factor)
    torch._foreach_mul_(working, factor)
    return working


# Into `storage`, the new values `new` where `skip` is false (all of them without a
# flag), rounded once for half precision; a skipped tensor is not changed, bit for bit.
def _store(storage: list[Tensor], new: list[Tensor], skip: Tensor | None) -> None:
    if skip is not None:
        for old, value in zip(storage, new):
            torch.where(skip, old, value.to(old.dtype), out=old)
    elif new is not storage:
        torch._foreach_copy_(storage, new)


# ## The step
#
# Same arguments as `sophiag_reference`, for tensors that may be on several devices
# and of several dtypes, plus the flag `found_inf` (above).
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
    found_inf: Tensor | None = None,
) -> None:
    r"""Take one Sophia step on every tensor of `params`, one foreach op per formula
    per group; none, not even a count, where `found_inf` (a one-element tensor on
    their device) is non-zero."""
    if not params:
        return

    # The step counters are scalars, often on the CPU while the parameters are on a
    # GPU: they are one group of their own, one foreach op for all of them.
    # Reference: `step += 1`, or, with a flag, $[\text{found\_inf} = 0]$ (above).
    count_steps(state_steps, found_inf)
    skip = None if found_inf is None else found_inf.reshape(()) != 0

    groups = group_by_device_and_dtype(params, grads, exp_avgs, hessians)
    for group_params, group_grads, group_exp_avgs, group_hessians in groups.values():
        # Reference: `grad = -grads[i]` when maximizing.
        if maximize:
            group_grads = torch._foreach_neg(group_grads)

        # Reference: the working copies (`float32` for half precision). With a flag,
        # the new values of $\theta$ and $m$ go where they may be dropped: the working
        # copies if they are copies, new tensors if they are the storage.
        params_w = _opmath_list(group_params)
        grads_w = _opmath_list(group_grads)
        exp_avgs_w = _opmath_list(group_exp_avgs)
        hessians_w = _opmath_list(group_hessians)
        group_skip = None if skip is None else skip.to(group_params[0].device)

        # Reference: `exp_avg_w.mul_(beta1).add_(grad_w, alpha=1 - beta1)`,
        # $m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t$ (line 6 of Algorithm 3). Stored at
        # once, so that the new $m$ and the new $\theta$ are never both alive.
        new_exp_avgs = _scaled(exp_avgs_w, group_exp_avgs, beta1, group_skip)
        torch._foreach_add_(new_exp_avgs, grads_w, alpha=1 - beta1)
        _store(group_exp_avgs, new_exp_avgs, group_skip)
        del new_exp_avgs

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

        # Reference: `param_w.mul_(1 - lr * weight_decay)`,
        # $\theta \leftarrow (1 - \eta_t\lambda)\,\theta$ (line 11 of Algorithm 3), then
        # `param_w.add_(update, alpha=-lr)`,
        # $\theta_t = \theta_{t-1} - \eta_t u_t$ (line 12). The decay comes here rather
        # than first: it touches only $\theta$ (see the reference), and here it needs no
        # temporary of its own beside $u_t$.
        decay = 1 - lr * weight_decay
        new_params = _scaled(params_w, group_params, decay, group_skip)
        torch._foreach_add_(new_params, updates, alpha=-lr)
        del updates

        # Reference: round the working copies into storage (half precision only), or,
        # with a flag, keep the old $\theta$ where it is set.
        _store(group_params, new_params, group_skip)


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
