r"""
---
title: Checks, dispatch, non-finite values and shards
summary: All that the optimizer settles before it writes anything, and how shards agree.
---

The [optimizer](optimizer.html) refuses a bad input before it changes anything: a step
that raised halfway would leave some layers a step ahead of others, with no copy of the
old values to go back to. This module holds all that is settled before the first write,
so that the optimizer's module reads as the class a user imports:

* the checks of the **hyperparameters** and of `bs` (and of a learning rate the
  parameters' dtype can hold), of the **parameters** and of the **estimates** given to
  `update_hessian` (a loaded state has [its own module](loading.html));
* the **choice of an implementation** per group (reference, foreach or the fused
  kernel), with the kernel's own checks;
* the **rule for non-finite values** (`nonfinite=`; the search itself is in
  [`sophia.nonfinite`](nonfinite.html));
* the **agreement of the shards** under FSDP, where each process holds part of a tensor.

Every error names the argument and the value it got, so the traceback alone says what
to fix. Why each check is made where it is, and what it costs, is on
[how the optimizer is built](../engineering/optimizer.md); how to use all of this under
DDP, FSDP and mixed precision is on the [scale page](../scale.md).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


# ## Hyperparameters
#
# A number is any real scalar, as in `torch.optim`: `int`, `float`, a NumPy scalar
# (`numbers.Real`), or a one-element CPU tensor; never a `bool`: `True` is the integer
# 1, so `SophiaG(params, True)` (a flag in the `lr` slot) would train with $\eta_t = 1$.
# `_number` gives its value as a Python `float` (`None` for anything else): the math
# is done on Python floats, so that a NumPy `float32` does not round it in `float32`.
def _number(x: Any) -> float | None:
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.device.type != "cpu" or x.dtype == torch.bool:
            return None
        if x.is_complex():
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    try:
        return float(x)
    except OverflowError:
        return math.inf


# One number against its lower bound, and finite: $+\infty$ passes every lower bound
# and NaN fails every comparison, so a bound alone would let either through. An `int`
# too large for a `float` (`10**400`) is refused as infinite.
def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool) -> None:
    number = _number(value)
    if number is None:
        raise TypeError(
            f"{name} must be a real number, "
            f"got {_show(value)} of type {type(value).__name__}"
        )
    ok = number >= low if low_inclusive else number > low
    if not (math.isfinite(number) and ok):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {_show(value)}")


# A value as the messages show it: a one-element tensor by its value, an `int` of
# hundreds of digits by its size.
def _show(value: Any) -> str:
    if isinstance(value, Tensor) and value.numel() == 1 and value.device.type == "cpu":
        return f"{value.item()!r} (a tensor)"
    if isinstance(value, int) and abs(value) > 10**30:
        return f"an int of {len(str(abs(value)))} digits"
    return repr(value)


# A whole parameter group, `where` naming it in the message (`""` for the
# constructor's defaults, `"param_groups[i]: "` afterwards): $\eta_t, \lambda \ge 0$,
# $\rho, \epsilon > 0$, $\beta_1, \beta_2 \in [0, 1)$, real `bool` flags, and not
# `foreach=True` with `fused=True`. What goes wrong outside each bound is in
# [the docs](../engineering/optimizer.md#validation).
def _check_group(group: dict, where: str, *, at_step: bool = False) -> None:
    _check_lr(group, where, at_step=at_step)
    _check_number(f"{where}rho", group["rho"], low=0.0, low_inclusive=False)
    _check_number(
        f"{where}weight_decay", group["weight_decay"], low=0.0, low_inclusive=True
    )
    _check_number(f"{where}eps", group["eps"], low=0.0, low_inclusive=False)
    betas = group["betas"]
    if not (isinstance(betas, Sequence) and len(betas) == 2):
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_number(f"{where}betas[{i}]", beta, low=0.0, low_inclusive=True)
        if not _number(beta) < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {beta!r}")
    for flag in ("maximize", "capturable"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{where}{flag} must be a bool, got {group[flag]!r}")
    for flag in ("foreach", "fused"):
        if group[flag] is not None and not isinstance(group[flag], bool):
            raise TypeError(
                f"{where}{flag} must be None or a bool, got {group[flag]!r}"
            )
    if group["foreach"] and group["fused"]:
        raise ValueError(
            f"{where}foreach=True and fused=True cannot both be set: "
            "pick one implementation"
        )


# Every group of an optimizer, as it is now: a scheduler or a user may have edited
# `param_groups[i]` since the constructor, and a NaN learning rate caught before a step
# costs nothing.
def _check_groups(param_groups: list[dict]) -> None:
    for gi, group in enumerate(param_groups):
        _check_group(group, where=f"param_groups[{gi}]: ", at_step=True)


# The learning rate is a number (a one-element CPU tensor included, read at each step
# for free) or, with `fused=True` only, a one-element floating tensor on the device that
# the kernel reads from device memory (for CUDA graphs) as a `float32`. Such a tensor's
# value is read only when the group is made (`at_step=False`): a read at each step
# would wait for the device, an error inside a graph capture.
def _check_lr(group: dict, where: str, *, at_step: bool) -> None:
    lr = group["lr"]
    if not isinstance(lr, Tensor) or lr.device.type == "cpu" and not group["fused"]:
        _check_number(f"{where}lr", lr, low=0.0, low_inclusive=True)
        return
    if not group["fused"]:
        raise TypeError(
            f"{where}lr is a tensor ({lr.dtype}, {lr.device}); "
            "a tensor lr off the CPU needs fused=True"
        )
    if lr.numel() != 1 or not lr.is_floating_point():
        raise ValueError(
            f"{where}lr as a tensor must hold one floating-point value, got shape "
            f"{tuple(lr.shape)} and dtype {lr.dtype}"
        )
    if not at_step:
        _check_number(f"{where}lr", lr.item(), low=0.0, low_inclusive=True)
        if lr.item() > torch.finfo(torch.float32).max:
            raise ValueError(
                f"{where}lr={lr.item()!r} as a tensor is read as a float32, whose "
                f"largest value is {torch.finfo(torch.float32).max!r}"
            )


# `bs` is $B$, which multiplies the stored `hessian`: zero, negative or infinite, it
# would make every step a sign step, flip it, or stall it. It is an argument of
# `step()`, not a group setting, as in the authors' code.
def _check_bs(bs: Any) -> None:
    _check_number("bs", bs, low=0.0, low_inclusive=False)


# The group's settings as the step's implementations take them: Python floats, whatever
# real scalar the user gave; `lr` stays a tensor only where the kernel reads it there.
def _hyper(group: dict) -> dict:
    lr = group["lr"]
    return dict(
        lr=lr if _number(lr) is None else _number(lr),
        beta1=_number(group["betas"][0]),
        rho=_number(group["rho"]),
        weight_decay=_number(group["weight_decay"]),
        eps=_number(group["eps"]),
    )


# ## A learning rate the dtype can hold
#
# The step computes $1 - \eta\lambda$ and $-\eta$ in the working precision (`float32`
# for every dtype but `float64`) and writes $\theta(1 - \eta\lambda) - \eta u$ into the
# parameter's dtype. A learning rate beyond what they can hold would write an infinity
# (or raise halfway through the step), so it is refused before any write, naming the
# group, the dtype and its limit. With $|1 - \eta\lambda| \le 1$ and $\eta$ below a
# quarter of the spacing of the dtype's largest values, no finite $\theta$ can
# overflow; only outside that range is $\max|\theta|$ read (a wait for the device).
def _check_step_range(plan: list[tuple], param_groups: list[dict]) -> None:
    for group, params, _tensors, _impl in plan:
        gi = next(i for i, g in enumerate(param_groups) if g is group)
        hyper = _hyper(group)
        if isinstance(hyper["lr"], Tensor):
            continue
        for dtype in sorted({_real_dtype(p.dtype) for p in params}, key=str):
            tensors = [p for p in params if _real_dtype(p.dtype) == dtype]
            _check_lr_fits(f"param_groups[{gi}]", hyper, dtype, tensors)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _check_lr_fits(where: str, hyper: dict, dtype: torch.dtype, params: list) -> None:
    lr, decay_rate = hyper["lr"], hyper["weight_decay"]
    working = torch.float64 if dtype == torch.float64 else torch.float32
    limit = torch.finfo(working).max
    decay = 1 - lr * decay_rate
    if lr > limit or decay < -limit:
        raise ValueError(
            f"{where}: lr={lr!r} (with weight_decay={decay_rate!r}) does not fit in "
            f"{working}, in which the step of its {dtype} parameters is computed "
            f"(largest value {limit!r}); the step was refused, nothing changed"
        )
    finfo = torch.finfo(dtype)
    if abs(decay) <= 1 and lr <= finfo.max * finfo.eps / 8:
        return
    largest = max(
        [float(_local(p).detach().abs().max()) for p in params if p.numel()] or [0.0]
    )
    bound = largest * abs(decay) + lr
    found = torch.tensor(float(bound * (1 + 2**-16) > finfo.max))
    if bool(_agree_across_shards(found, params)):
        raise ValueError(
            f"{where}: lr={lr!r} with weight_decay={decay_rate!r} would take a {dtype} "
            f"parameter of magnitude up to {largest:g} past the largest {dtype} "
            f"({finfo.max:g}): |theta| * |1 - lr * weight_decay| + lr = {bound:g}; "
            "the step was refused, nothing changed"
        )


# What a NaN or an infinity in a gradient or an estimate does; one rule for the whole
# optimizer, so that a skipped step skips every group.
NONFINITE_RULES = ("raise", "skip", "unchecked")


def _check_nonfinite_rule(nonfinite: Any) -> None:
    if nonfinite not in NONFINITE_RULES:
        raise ValueError(
            f"nonfinite must be one of {', '.join(map(repr, NONFINITE_RULES))}, "
            f"got {nonfinite!r}"
        )


# `SophiaH`'s own settings, checked before the optimizer is built, so that a refused
# `SophiaH` leaves nothing half-built.
def _check_hutchinson_settings(n_samples: Any, distribution: Any) -> None:
    if not (
        isinstance(n_samples, int)
        and not isinstance(n_samples, bool)
        and n_samples >= 1
    ):
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(
            f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}"
        )


# ## Choosing an implementation
#
# As in `torch.optim.AdamW`, `foreach=None` picks the foreach version when every
# parameter is a plain tensor (a subclass may lack the `torch._foreach_*` ops) on a
# device with foreach kernels, and the reference otherwise (on the CPU a foreach op is
# a loop over the per-tensor kernels, so there is nothing to gain).
def _foreach_devices() -> set[str]:
    return {"cuda", "xpu", torch._C._get_privateuse1_backend_name()}


def _default_foreach(params: list[Tensor]) -> bool:
    devices = _foreach_devices()
    return all(
        type(p) in (Tensor, torch.nn.Parameter) and p.device.type in devices
        for p in params
    )


# Per group: `fused=True` and `foreach=True`/`False` are obeyed, never quietly
# downgraded; with neither set, foreach or the reference as above, as in
# `torch.optim.AdamW`: the kernel is opt-in (`fused=True`) until it is proven on every
# device. The rules and their reasons are in
# [the docs](../engineering/optimizer.md#choosing-an-implementation).
def _implementation(
    group: dict, params: list[Tensor], tensors: Sequence[Tensor] = ()
) -> str:
    if group["fused"]:
        return "fused"
    if group["foreach"] is not None:
        return "foreach" if group["foreach"] else "reference"
    return "foreach" if _default_foreach(params) else "reference"


# Every group with work to do gets its implementation and, if it asked for the kernel,
# the kernel's checks and build, before any group is stepped: a refusal in the second
# group after the first was updated would be half a step. The fused module is imported
# only here, so a user who never asks for the kernel never loads it.
def _plan(groups: list[tuple[dict, list[Tensor], list[Tensor]]]) -> list[tuple]:
    plan = []
    for group, params, tensors in groups:
        if not params:
            continue
        implementation = _implementation(group, params, tensors)
        if implementation == "fused":
            from .fused import check_fused_tensors, load_extension

            check_fused_tensors({"params": params, "grads or estimates": tensors})
            for device_type in sorted({p.device.type for p in params}):
                load_extension(device_type)
        plan.append((group, params, tensors, implementation))
    return plan


# ## Gradients and estimates
#
# The parameters with a gradient, per group (every group appears, so that indices in
# messages are those of `param_groups`). A sparse gradient is refused: Sophia's state
# is dense, and a sparse $m$ would be another algorithm.
def _params_with_grad(
    param_groups: list[dict],
) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
    plan = []
    for gi, group in enumerate(param_groups):
        params, grads = [], []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            _check_not_meta(f"param_groups[{gi}]['params'][{pi}]", p)
            if p.grad.is_sparse:
                raise RuntimeError(
                    "SophiaG does not support sparse gradients: "
                    f"param_groups[{gi}]['params'][{pi}] "
                    f"has a gradient with layout {p.grad.layout}"
                )
            params.append(p)
            grads.append(p.grad)
        plan.append((group, params, grads))
    return plan


# A parameter on the `meta` device has a shape and no values (a model built for a
# deferred initialization): there is nothing to step until it is materialized.
def _check_not_meta(where: str, p: Tensor) -> None:
    if p.device.type == "meta":
        raise ValueError(
            f"{where} is on the meta device (shape {tuple(p.shape)}, no values): "
            "materialize the model first, e.g. model.to_empty(device=...) and "
            "initialize it; nothing was changed"
        )


# `update_hessian(estimates)` takes one entry per parameter of all groups, in the order
# of `param_groups` (`None` skips one). They are matched to the parameters, not to the
# gradients, so a parameter without a gradient can still be refreshed; every entry is
# checked before any is folded in. A lone tensor is refused rather than iterated over
# (which would silently yield its rows).
def _match_estimates(
    estimates: Any, param_groups: list[dict]
) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
    if isinstance(estimates, Tensor) or not isinstance(estimates, Iterable):
        raise TypeError(
            "estimates must be a list with one tensor (or None) per parameter, "
            f"got {type(estimates).__name__}"
        )
    estimates = list(estimates)
    n_params = sum(len(group["params"]) for group in param_groups)
    if len(estimates) != n_params:
        raise ValueError(
            f"estimates has {len(estimates)} entries but the optimizer has "
            f"{n_params} parameters (one entry per parameter of all groups, in order; "
            "None to skip one)"
        )
    plan, index = [], 0
    for gi, group in enumerate(param_groups):
        params, ests = [], []
        for pi, p in enumerate(group["params"]):
            est = estimates[index]
            if est is not None:
                _check_not_meta(f"param_groups[{gi}]['params'][{pi}]", p)
                _check_estimate(index, est, p)
                params.append(p)
                ests.append(est)
            index += 1
        plan.append((group, params, ests))
    return plan


# One estimate against its parameter. A shape that differs would broadcast instead of
# failing, another device would fail halfway through the fold, and a real estimate of a
# complex parameter does not match its real view (see the [reference](reference.html)).
def _check_estimate(index: int, est: Any, p: Tensor) -> None:
    where = f"estimates[{index}]"
    if not isinstance(est, Tensor):
        raise TypeError(f"{where} must be a tensor or None, got {type(est).__name__}")
    if est.shape != p.shape:
        raise ValueError(
            f"{where} has shape {tuple(est.shape)} "
            f"but its parameter has shape {tuple(p.shape)}"
        )
    if est.device != p.device:
        raise ValueError(
            f"{where} is on {est.device} but its parameter is on {p.device}"
        )
    if est.is_sparse:
        raise ValueError(f"{where} is sparse ({est.layout}); estimates must be dense")
    if not (est.is_floating_point() or est.is_complex()):
        raise TypeError(
            f"{where} has dtype {est.dtype}; estimates must be floating point"
        )
    if est.is_complex() != p.is_complex():
        raise TypeError(
            f"{where} has dtype {est.dtype} but its parameter has dtype {p.dtype}"
        )


# ## Shards
#
# Under FSDP a parameter and its state are `DTensor`s, and each process holds one
# shard. `_local` gives the shard of a `DTensor` and the tensor itself otherwise.
def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


# The processes that hold shards of the same parameters must agree, or one would skip a
# step the others take: the local flag (`1` for "found") is reduced with `MAX` over
# every process group of every mesh, on the mesh's device (the CPU for `gloo`, the GPU
# for `nccl`). Under DDP the gradients are already all-reduced: no collective.
def _agree_across_shards(found: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    meshes = {
        id(t.device_mesh): t.device_mesh for t in tensors if hasattr(t, "device_mesh")
    }
    for mesh in meshes.values():
        for dim in range(mesh.ndim):
            flag = found.to(mesh.device_type)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
            found = flag.to(found.device)
    return found


# Counts made over the local shards (`win_rate()`), summed over the processes that hold
# the other shards. `_add_count` files one state tensor's counts under its kind of
# sharding: its mesh and the mesh dimensions along which it is sharded (not those along
# which it is replicated, which would count a shard twice); `()` is an ordinary tensor,
# whose counts are already whole.
def _add_count(
    counts: dict[tuple, list], t: Tensor, unclipped: int, total: int
) -> None:
    key, mesh = (), None
    if hasattr(t, "device_mesh"):
        mesh = t.device_mesh
        key = (id(mesh), tuple(d for d, pl in enumerate(t.placements) if pl.is_shard()))
    entry = counts.setdefault(key, [mesh, 0, 0])
    entry[1] += unclipped
    entry[2] += total


# The sums, with one all-reduce per kind of sharding and sharded dimension.
def _sum_across_shards(counts: dict[tuple, list]) -> tuple[int, int]:
    unclipped, total = 0, 0
    for key, (mesh, u, n) in counts.items():
        if key:
            both = torch.tensor([u, n], dtype=torch.int64, device=mesh.device_type)
            for dim in key[1]:
                dist.all_reduce(both, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            u, n = (int(v) for v in both.tolist())
        unclipped += u
        total += n
    return unclipped, total
