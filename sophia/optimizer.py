r"""
---
title: The SophiaG and SophiaH optimizers
summary: The torch.optim classes users import; state, parameter groups, checks, and dispatch to an implementation.
---

# The `SophiaG` and `SophiaH` optimizers

This module is what a user imports. It holds no math of its own: the step is the
[reference](reference.html) or the [`torch._foreach` version](foreach.html), and the
Hessian estimates come from [`sophia.hessian`](hessian.html). What lives here is the
bookkeeping a serious `torch.optim` optimizer needs:

* the **constructor and calling convention of the authors' `SophiaG`**, so that ours is
  a drop-in replacement: `SophiaG(params, lr=1e-4, betas=(0.965, 0.99), rho=0.04,
  weight_decay=1e-1)`, then `update_hessian()` every $k$ steps and `step(bs=...)` every
  step, with the same state keys (`step`, `exp_avg`, `hessian`), so checkpoints move
  both ways;
* the **PyTorch conventions** on top: keyword-only `foreach=` and `fused=` (see
  [the fused kernel](fused.html)), `maximize`,
  per-group hyperparameters, learning-rate schedulers, `state_dict()` /
  `load_state_dict()`, `zero_grad()`;
* **checks on every input**, done before anything is changed, so that a step that is
  refused leaves parameters and state exactly as they were;
* the **rules for non-finite values** (a NaN or an infinity in a gradient or an estimate
  refuses or skips the step, `nonfinite=`), for **mixed precision** (`GradScaler` for the
  step and for the Hessian refresh, `update_hessian(scaler=...)`) and for **checkpoints**
  (`load_state_dict` refuses a state that does not fit the parameters). Under data
  parallelism (DDP, FSDP) nothing changes, except that $B$ is the *global* number of
  predictions; the [scale page](../scale.md) says how to use all of this.

A training loop with Sophia-G (the reference recipe; `gnb_loss` samples the labels and
returns $B$, the number of predictions in the batch it was given; in the recipe the
Hessian batch has the training batch's shape, so $B$ is also `y.numel()`):

```python
opt = SophiaG(model.parameters(), lr=6e-4, rho=0.05, weight_decay=0.2)
B = batch_size * block_size
for it, (x, y) in enumerate(batches):
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step(bs=B)
    opt.zero_grad(set_to_none=True)
    if it % k == k - 1:
        sampled_loss, B = gnb_loss(model(next_x))
        sampled_loss.backward()
        opt.update_hessian()
        opt.zero_grad(set_to_none=True)
```
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

# The three implementations of the step come from their own modules, and they share one
# signature (that of `sophiag_reference`), so this module can hold them in a table and
# pick one per group. The fused module is imported only where it is used, inside the
# functions below: a user who never asks for the kernel never loads the code that builds
# it.
from .foreach import hessian_ema_foreach, sophiag_foreach
from .hessian import hutchinson
from .reference import (
    hessian_ema_reference,
    sophiag_reference,
    unclipped_count_reference,
)

__all__ = ["SophiaG", "SophiaH"]


# ## Checking the hyperparameters
#
# Every check names the argument and the value it got. They run in the constructor,
# when a parameter group is added, and again at every step, because a learning-rate
# scheduler or a user may edit `param_groups[i]["lr"]` at any time: a NaN learning rate
# caught before the step costs nothing, one caught after has already been written into
# every parameter.
#
# A number is an `int` or a `float`, but not a `bool`: in Python `True` is the integer 1,
# so without this exclusion `SophiaG(params, True)` (a flag passed in the `lr` slot)
# would train with $\eta_t = 1$. NumPy's `float64` subclasses `float` and passes.
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# One number against its lower bound. `math.isfinite` is checked along with the bound:
# $+\infty$ passes every lower bound, and NaN fails every comparison, so a bound alone
# would let an infinite learning rate through. `low_inclusive` says whether the bound
# itself is allowed: $\eta_t = 0$ (the first step of a warm-up) and $\lambda = 0$ (no
# decay) are legitimate, $\rho = 0$ and $\epsilon = 0$ are not (see `_check_group`).
def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool) -> None:
    if not _is_number(value):
        raise TypeError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}"
        )
    ok = value >= low if low_inclusive else value > low
    if not (math.isfinite(value) and ok):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


# A whole parameter group, with `where` naming it in the message (`""` for the
# constructor's defaults, `"param_groups[i]: "` afterwards). The bounds, and what goes
# wrong outside them:
#
# * $\rho > 0$: with $\rho = 0$ the preconditioner $\max(\rho B h, \epsilon)$ is always
#   $\epsilon$ and every step is a sign step, whatever $h$ says;
# * $\epsilon > 0$: with $\epsilon = 0$ a coordinate with $m = 0$ and $h = 0$ (an
#   embedding row no batch has touched yet, before the first refresh) computes $0/0$, a
#   NaN that is then written into $\theta$;
# * $\lambda \ge 0$: a negative decay grows the weights;
# * $\beta_1, \beta_2 \in [0, 1)$: at $\beta = 1$ an EMA never leaves its initial zeros,
#   so $m_t = 0$ (no step at all, only the decay) or $h_t = 0$ (sign steps forever);
# * the flags are real `bool`s (or `None` where "choose for me" is meant), not merely
#   truthy values: `capturable="no"` is truthy and would mean `True`;
# * `foreach=True` together with `fused=True` asks for two implementations at once;
#   `torch.optim.AdamW` refuses the same combination.
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
        if not beta < 1.0:
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
            f"{where}foreach=True and fused=True cannot both be set: pick one implementation"
        )


# The learning rate is a Python number, or, with `fused=True`, a one-element floating
# tensor that the kernel reads from device memory, so that a step captured in a CUDA
# graph follows a schedule that writes into that tensor. A tensor's value is checked
# when the group is made, not at every step: reading it would wait for the device, and
# inside a CUDA graph capture that is an error.
def _check_lr(group: dict, where: str, *, at_step: bool) -> None:
    lr = group["lr"]
    if not isinstance(lr, Tensor):
        # A Python learning rate is checked like any other number, every time.
        _check_number(f"{where}lr", lr, low=0.0, low_inclusive=True)
        return
    # A tensor learning rate is refused unless the group asks for the kernel. The reference
    # and foreach versions use `lr` as a Python number (`alpha=-lr`, `1 - lr * weight_decay`):
    # a tensor there would either fail inside the step, after other groups were updated, or
    # be read with `.item()` at every step, a wait for the device. The authors' code shows
    # the first outcome: its `capturable=True` path calls `lr.neg()`, which a float does not
    # have, and would pass a tensor as `value=`, which `addcmul_` does not accept. Here a
    # tensor `lr` goes only to the kernel, which reads it from memory, and any other
    # combination is refused when the group is made.
    if not group["fused"]:
        raise TypeError(
            f"{where}lr is a tensor ({lr.dtype}, {lr.device}); a tensor lr needs fused=True"
        )
    if lr.numel() != 1 or not lr.is_floating_point():
        raise ValueError(
            f"{where}lr as a tensor must hold one floating-point value, got shape "
            f"{tuple(lr.shape)} and dtype {lr.dtype}"
        )
    # The value is read once, when the group is made, outside any capture: one wait for the
    # device at setup costs nothing, and catches a NaN or negative schedule start. At a
    # step (`at_step=True`) only the shape and dtype above are checked, which needs no read.
    if not at_step:
        _check_number(f"{where}lr", lr.item(), low=0.0, low_inclusive=True)


# `bs` is $B$, the number of predictions behind one estimate (see the reference). It
# multiplies the stored `hessian`, so a zero, negative or infinite value would turn
# every step into a sign step, flip it, or stall it.
#
# `bs` is an argument of `step()`, not a group setting, as in the reference code: it may
# change from one call to the next (a batch-size schedule), and one value applies to all
# groups. It is checked first in `step()`, before the groups.
def _check_bs(bs: Any) -> None:
    _check_number("bs", bs, low=0.0, low_inclusive=False)


# ## Choosing an implementation
#
# As in `torch.optim.AdamW`: `foreach=True` or `False` is obeyed; `foreach=None` picks
# the foreach version when every parameter is a plain tensor on a device that has
# foreach kernels (CUDA, XPU, or a custom accelerator), and the reference otherwise.
# On the CPU, PyTorch's foreach ops are a loop over the per-tensor kernels, so there
# is nothing to gain and the reference is the default there, as it is for AdamW.
#
# The [fused kernel](fused.html) is used when asked for (`fused=True`, on CUDA or, with
# the CPU build of the same kernel, on the CPU), and when nothing is asked for
# (`fused=None`, `foreach=None`) on CUDA parameters it can take, if it can be built on
# this machine: the first step then compiles it once (about a minute, cached on disk).
# Where it cannot be built, `fused=None` quietly uses the foreach version instead.
#
# The device types with foreach kernels are those `torch.optim` lists: CUDA, XPU, and
# whatever name a custom accelerator registered for PyTorch's `privateuse1` backend.
def _foreach_devices() -> set[str]:
    return {"cuda", "xpu", torch._C._get_privateuse1_backend_name()}


# Like `torch.optim.optimizer._default_to_fused_or_foreach`, the test is on the exact
# type: a tensor *subclass* (say, a wrapper tensor from another library) may not
# implement the `torch._foreach_*` ops, so only plain tensors and `nn.Parameter`s
# qualify.
def _default_foreach(params: list[Tensor]) -> bool:
    devices = _foreach_devices()
    return all(
        type(p) in (Tensor, torch.nn.Parameter) and p.device.type in devices
        for p in params
    )


# The rules, in the order they are tested, for one group and the tensors it is about to
# use (`tensors` are the gradients, or the estimates for a Hessian refresh):
#
# 1. `fused=True` is obeyed, on any device: if the kernel cannot take a tensor, the
#    checks in `_plan` say so with an error. An explicit request is never quietly
#    downgraded, as `AdamW(fused=True)` raises on parameters its kernel cannot take.
# 2. `foreach=True` or `False` is obeyed.
# 3. Otherwise, parameters that foreach cannot take (CPU tensors, subclasses) get the
#    reference.
# 4. On CUDA, with `fused=None`, the kernel is used if it builds here and takes every
#    parameter *and* every gradient (it refuses a non-contiguous one, for instance).
#    This is where we depart from `torch.optim.AdamW`, which never picks its fused kernel
#    unasked: ours is tested against the reference, and it is the step that moves the
#    least memory.
# 5. Everything else gets foreach.
#
# The choice is made per group and per call, from the tensors at hand, so a group whose
# gradients change layout falls back for that step only. `fused=False` skips rule 4.
def _implementation(
    group: dict, params: list[Tensor], tensors: Sequence[Tensor] = ()
) -> str:
    if group["fused"]:
        return "fused"
    if group["foreach"] is not None:
        return "foreach" if group["foreach"] else "reference"
    if not _default_foreach(params):
        return "reference"
    if group["fused"] is None and all(p.device.type == "cuda" for p in params):
        from . import fused

        if fused.fused_available("cuda") and fused.fused_supports([*params, *tensors]):
            return "fused"
    return "foreach"


# From the name of an implementation to its function: one for the step, one for the
# Hessian EMA. They take the same arguments, which is what makes the choice above a
# matter of one name.
def _step_function(implementation: str) -> Callable:
    if implementation == "fused":
        from .fused import sophiag_fused

        return sophiag_fused
    return sophiag_foreach if implementation == "foreach" else sophiag_reference


def _hessian_function(implementation: str) -> Callable:
    if implementation == "fused":
        from .fused import hessian_ema_fused

        return hessian_ema_fused
    return hessian_ema_foreach if implementation == "foreach" else hessian_ema_reference


# ## Non-finite values
#
# A NaN or an infinity in a gradient reaches every later step: $m$ keeps it forever
# ($\beta_1 \cdot \text{NaN}$ is NaN), the ratio $m/\max(\rho B h, \epsilon)$ is NaN, the
# clip does not clip a NaN (`clamp` passes it through), and $\theta$ becomes NaN. An
# infinite $\hat h$ is no better: the next $m/\infty$ is $0$, but once $m$ is infinite
# too, $\infty/\infty$ is NaN. So the step looks at its inputs before it writes anything,
# and the constructor's `nonfinite=` says what happens when one is not finite:
#
# * `"raise"` (the default): the step (or the refresh) is refused with a
#   `FloatingPointError` that names the parameter and counts its bad values; nothing
#   has changed, so the caller can inspect the batch, lower the learning rate, and go on;
# * `"skip"`: the whole step (every group) or the whole refresh is skipped, nothing
#   changes, and `skipped_steps` or `skipped_refreshes` counts it: what
#   `torch.amp.GradScaler` does with an overflow, for runs that would rather lose a batch
#   than stop;
# * `"unchecked"`: no look at all, for whoever checks elsewhere and cannot afford the cost
#   below. A NaN then goes where it goes: this is the only setting in which one reaches
#   the parameters.
#
# What it costs. One more read of every gradient (its sum, below), and one wait for the
# device per step to read the answer on the host. On the CPU the read is the whole cost,
# a few milliseconds per ten million parameters (the [scale page](../scale.md) has the
# measurement); on a GPU the wait also stops the host from queuing the next step's
# kernels early. Two cases are never checked here, because someone else already has:
# under a `GradScaler` that hands `found_inf` to the step (`fused=True`), which skips
# an overflowing step on the device, and inside a CUDA graph capture, where a wait for
# the device is an error; there the check is the caller's (a `GradScaler`, or
# `"unchecked"` said out loud).
#
# Negative $\hat h$ (Hutchinson) is *not* a non-finite value and is not refused: the
# guard $\max(\rho B h, \epsilon)$ makes the denominator positive, the ratio is then at
# least as large as the Newton step, and the clip bounds the update by $\eta$ per
# coordinate, as for any coordinate with $h = 0$ (see the [reference](reference.html)).
NONFINITE_RULES = ("raise", "skip", "unchecked")


# Under FSDP a parameter is a `DTensor`, and each process holds one shard of it. A
# shard is an ordinary tensor, and the check reads the shards: a NaN then is seen by
# the one process whose shard holds it. `_local` gives the shard of a `DTensor` and the
# tensor itself otherwise.
def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


# The processes that hold shards of the same parameters must agree, or one would skip a
# step that the others take, and the shards of one parameter would drift apart. So the
# local answer (`1` for "found a non-finite value") is reduced with `MAX` over every
# process group of every mesh the parameters live on: one small collective per step,
# only when there are `DTensor`s. (Under DDP the gradients are all-reduced before the
# step, so a NaN on one process is a NaN on all of them, and no collective is needed.)
def _agree_across_shards(found: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    meshes = {
        id(t.device_mesh): t.device_mesh for t in tensors if hasattr(t, "device_mesh")
    }
    for mesh in meshes.values():
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            # The flag travels on the device the process group's backend works on (the CPU
            # for `gloo`, the GPU for `nccl`), which is the device of the mesh.
            flag = found.to(mesh.device_type)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            found = flag.to(found.device)
    return found


# `True` if every element of every tensor is finite. The test is a sum: a NaN or an
# infinity anywhere makes the sum of a tensor non-finite ($\infty + x = \infty$,
# $\infty - \infty$ and $\text{NaN} + x$ are NaN), and a sum is the cheapest pass over
# memory PyTorch has (vectorized, no temporary tensor; on the CPU about eight times
# faster than `torch.isfinite(g).all()` or an $\infty$-norm). The converse can fail: the
# sum of finite values may overflow. So a tensor whose sum is not finite is looked at
# again, element by element, and only a non-finite *element* counts. Half-precision
# tensors are summed in `float32`, where such an overflow needs about $10^{34}$ values at
# `float16`'s largest. The sums of one device and dtype are stacked and tested at
# once; reading the answer is the one wait for the device.
def _all_finite(tensors: Sequence[Tensor]) -> bool:
    if not tensors:
        return True
    # The sums, grouped by device and by the sum's dtype, so that each group is stacked
    # into one tensor and tested with one `isfinite`.
    local = [_local(t) for t in tensors]
    groups: dict[tuple, list[Tensor]] = {}
    for t in local:
        s = (
            t.sum(dtype=torch.float32)
            if t.dtype in (torch.float16, torch.bfloat16)
            else t.sum()
        )
        groups.setdefault((s.device, s.dtype), []).append(s)
    flags = [(~torch.stack(sums).isfinite()).any().cpu() for sums in groups.values()]
    found = torch.stack(flags).any().float()
    # A sum that is not finite: look at the elements, the slow path, taken at most once.
    if bool(found):
        found = torch.tensor(
            float(not all(bool(torch.isfinite(t).all()) for t in local))
        )
    found = _agree_across_shards(found, tensors)
    return not bool(found)


# The slow path, taken only once something was found: which parameter, and how many of
# its values. Under FSDP another process may hold the bad shard, and the message says so.
def _describe_nonfinite(named: Sequence[tuple[str, Tensor]], what: str) -> str:
    for name, t in named:
        local = _local(t)
        n_bad = int((~torch.isfinite(local)).sum())
        if n_bad:
            kinds = []
            if bool(torch.isnan(local).any()):
                kinds.append("NaN")
            if bool(torch.isinf(local).any()):
                kinds.append("inf")
            return (
                f"{name} has a {what} with {n_bad} non-finite value(s) ({' and '.join(kinds)}) "
                f"of {local.numel()} (shape {tuple(t.shape)}, dtype {t.dtype})"
            )
    return f"a {what} on another process holds non-finite values"


class SophiaG(Optimizer):
    r"""Sophia with the Gauss-Newton-Bartlett estimator: a drop-in replacement for the authors' `SophiaG`.

    The first five arguments are the authors' (names and defaults); the others are
    keyword-only and follow PyTorch's conventions.

    Args:
        params: parameters or parameter groups, as for any `torch.optim` optimizer.
        lr: $\eta$, the largest step one coordinate can take (before weight decay).
        betas: $(\beta_1, \beta_2)$, the EMA rates of the momentum and of the Hessian.
        rho: $\rho$, how many Newton steps fit in one clipped step.
        weight_decay: $\lambda$, decoupled weight decay, applied as $\theta \mathrel{*}= 1 - \eta\lambda$.
        maximize: maximize the objective instead of minimizing it.
        capturable: keep the step counters on the parameters' device; the step never
            synchronizes with the host either way.
        foreach: `True` for the `torch._foreach` version, `False` for the reference,
            `None` to choose as `torch.optim.AdamW` does.
        fused: `True` for the fused kernel (one pass over memory per step; CUDA, or
            the CPU build of the same kernel on the CPU), `False` never, `None` to use it
            on CUDA when it can be built and to fall back to foreach quietly otherwise.
            With `fused=True`, `lr` may be a one-element tensor (for CUDA graphs), and
            `torch.amp.GradScaler` hands the loss scale to the kernel instead of
            unscaling the gradients itself.
        eps: $\epsilon$ in $\max(\rho B h, \epsilon)$ (the authors hard-code `1e-15`).
        nonfinite: what a NaN or infinity in a gradient or an estimate does: `"raise"`
            (refuse with `FloatingPointError`, nothing changed), `"skip"` (skip the step or
            refresh, counted in `skipped_steps` / `skipped_refreshes`), or `"unchecked"`.

    Per step: `step(closure=None, bs=5120)`, with `bs` the number of predictions
    (tokens) per step, $B$, over all data-parallel processes. Every $k$ steps:
    back-propagate the loss from `sophia.gnb_loss`, then `update_hessian()`
    (`update_hessian(scaler=scaler)` if that loss was scaled by a `GradScaler`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        maximize: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        eps: float = 1e-15,
        nonfinite: str = "raise",
    ) -> None:
        # Every setting goes into `defaults`, the flags included, so that a parameter group can
        # override any of them: a group may be `fused=True` while another, holding tensors the
        # kernel cannot take, is `foreach=True` (a "mixed configuration"). `bs` is not here: it
        # is an argument of each `step()`, as in the authors' code.
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            fused=fused,
        )
        # The defaults are checked before `Optimizer.__init__` runs, so a bad argument fails with
        # the argument's own name rather than as the first group's. `Optimizer.__init__` then
        # calls `add_param_group` (below) once per group, and each group is checked with the
        # defaults filled in.
        _check_group(defaults, where="")
        # The rule for non-finite values is one for the whole optimizer, not per group: a
        # skipped step skips every group, so that no layer is a step ahead of another.
        if nonfinite not in NONFINITE_RULES:
            raise ValueError(
                f"nonfinite must be one of {', '.join(map(repr, NONFINITE_RULES))}, got {nonfinite!r}"
            )
        super().__init__(params, defaults)
        self.nonfinite = nonfinite
        # How many steps and refreshes were skipped for non-finite values (with
        # `nonfinite="skip"`, and refreshes under a `GradScaler` that overflowed). They are
        # counters for the training loop to log, not part of `state_dict()`.
        self.skipped_steps = 0
        self.skipped_refreshes = 0
        # $B$ of the last step, kept for `win_rate()`, which has no `bs` of its own to use.
        self._last_bs: float | None = None
        # The flag `torch.amp.GradScaler` looks for (see "The step" below). It is set only for
        # `fused=True`, as `torch.optim.AdamW` does: with `fused=None` the implementation is
        # decided at each step, so the scaler must keep unscaling the gradients itself.
        if fused:
            self._step_supports_amp_scaling = True

    # Every group is checked with its defaults filled in, before it joins the
    # optimizer: a bad group is never half-added.
    #
    # `Optimizer.add_param_group` fills in the defaults itself, by writing them into the
    # dict it is given. Checking a merged copy first sees the same values, and a refused
    # group leaves both the optimizer and the caller's dict as they were.
    # `len(self.param_groups)` is the index the new group would get.
    def add_param_group(self, param_group: dict) -> None:
        r"""Add a parameter group, after checking it with the defaults filled in (see `torch.optim.Optimizer`)."""
        merged = {**self.defaults, **param_group}
        _check_group(merged, where=f"param_groups[{len(self.param_groups)}]: ")
        super().add_param_group(param_group)

    # Checkpoints written by the authors' `SophiaG` (or by an older version of this
    # class) lack our keyword-only flags and may hold the step as a Python number:
    # fill in the defaults so they load and continue unchanged.
    def __setstate__(self, state: dict) -> None:
        # `torch.optim.Optimizer.load_state_dict` ends by calling this method with the loaded
        # groups and state, so this is where an old checkpoint is brought up to date. Defaults
        # that a group lacks are those of this constructor (the authors' optimizer never had
        # `eps`: it is their hard-coded constant).
        super().__setstate__(state)
        # An optimizer pickled whole by an older version lacks the non-finite rule and its
        # counters: the defaults of the constructor.
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("skipped_refreshes", 0)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("eps", 1e-15)
        # The step counter must be a tensor, because every implementation counts it in place.
        # A Python number is converted into a CPU tensor here; a counter that should live on the
        # device (`capturable`, `fused`) stays on the CPU until the checkpoint is saved and
        # loaded again. The count does not enter the update (no bias correction), so this costs
        # at most the wait for the device that [the fused kernel](fused.html) describes for CPU
        # counters under a `GradScaler`.
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)

    # ## Loading a checkpoint
    #
    # `torch.optim.Optimizer.load_state_dict` checks that the groups have as many
    # parameters as before, and then takes the state as it comes: a `hessian` of another
    # shape would be broadcast in the step, or fail halfway through it, and a NaN in it
    # would be written into the parameters at the next step. So the state is checked here
    # first, against the parameters it will belong to, and a state that does not fit is
    # refused with a `ValueError` that names the parameter and the key, before anything
    # is loaded:
    #
    # * `exp_avg` and `hessian`, where present, are floating-point tensors of the
    #   parameter's shape, with no NaN; `exp_avg` is finite. A negative `hessian` is
    #   allowed (Hutchinson's estimates make one, and the step's guard handles it), and so
    #   is an infinite one: the optimizer itself reaches $h = \infty$ from finite
    #   gradients near the dtype's largest value ($\hat g^2$ overflows), the step then
    #   moves that coordinate by zero (or by $\eta$ for $-\infty$), and a checkpoint of
    #   such a run must load;
    # * a state with `exp_avg` and no `hessian` (a checkpoint of another optimizer, e.g.
    #   AdamW's, whose `exp_avg` is the same $m$) is the documented recovery: it loads, and
    #   $h$ starts at zero, so the steps are sign-of-momentum steps of size $\eta$ until the
    #   next `update_hessian()`; a warning says how many parameters are in that case.
    #
    # Where the groups do not line up, the check leaves the refusal to PyTorch's own
    # (it names the groups and their sizes).
    def load_state_dict(self, state_dict: dict) -> None:
        r"""Load a state written by `state_dict()` (or by the authors' `SophiaG`), after checking it fits."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) == len(self.param_groups) and all(
            len(s["params"]) == len(g["params"])
            for s, g in zip(saved_groups, self.param_groups)
        ):
            missing_hessian = 0
            for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                for pi, (key, p) in enumerate(zip(saved["params"], group["params"])):
                    state = state_dict["state"].get(key)
                    if state is None:
                        continue
                    for name in ("exp_avg", "hessian"):
                        if name in state:
                            _check_loaded(
                                f"param_groups[{gi}]['params'][{pi}]",
                                name,
                                state[name],
                                p,
                            )
                    missing_hessian += "exp_avg" in state and "hessian" not in state
            if missing_hessian:
                warnings.warn(
                    f"the loaded state of {missing_hessian} parameter(s) has no 'hessian' (a checkpoint of another "
                    "optimizer?): h starts at zero, and their steps are sign steps of size lr until the next "
                    "update_hessian()",
                    stacklevel=2,
                )
        super().load_state_dict(state_dict)

    # ## State
    #
    # Per parameter, the three keys of the reference: `step` (a `float32` scalar
    # tensor, on the CPU unless `capturable` or `fused`, where it lives on the
    # parameter's device so that counting it never waits for the device), `exp_avg`
    # $m$ and `hessian` $h$, both of
    # the parameter's shape and dtype (so a `bfloat16` model keeps `bfloat16` state,
    # as with `torch.optim.AdamW`; the math is done in `float32` anyway). A state
    # missing a key, e.g. loaded from another optimizer's checkpoint, gets zeros for
    # it, as the authors' code does for `hessian`: with $h = 0$ every step is a
    # sign-of-momentum step of size $\eta$ until the next refresh.
    def _state_for(self, p: Tensor, group: dict) -> dict:
        # State is created lazily, at the parameter's first step or refresh, as in
        # `torch.optim.AdamW`: a parameter that never receives a gradient never gets state.
        # The counter is a `float32` tensor as in `torch.optim`; since the count does not enter
        # the update, the fact that `float32` stops counting exactly at $2^{24}$ steps only
        # matters to whoever logs it. `preserve_format` gives a `channels_last` parameter
        # `channels_last` state, so that the elementwise ops read all tensors in the same order
        # (such a parameter is not contiguous, so the kernel does not take it: `fused=None`
        # falls back to foreach).
        state = self.state[p]
        if "step" not in state:
            device = (
                p.device
                if group["capturable"] or group["fused"]
                else torch.device("cpu")
            )
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        for key in ("exp_avg", "hessian"):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # Parameters with a gradient, per group. A parameter whose `.grad` is `None` is
    # skipped and its state is not touched (not even created). Sparse gradients are
    # refused: Sophia's state is dense, and a sparse $m$ would be a different
    # algorithm.
    #
    # Every group appears in the result, even with no parameter that has a gradient, so that
    # the indices in error messages are those of `param_groups`; `_plan` drops the empty
    # ones. Nothing is written here: the state is created later, after every check.
    def _params_with_grad(self) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        plan = []
        for gi, group in enumerate(self.param_groups):
            params, grads = [], []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"SophiaG does not support sparse gradients: param_groups[{gi}]['params'][{pi}] "
                        f"has a gradient with layout {p.grad.layout}"
                    )
                params.append(p)
                grads.append(p.grad)
            plan.append((group, params, grads))
        return plan

    # ## The step
    #
    # Order matters for "a refused step changes nothing": first every check (the
    # hyperparameters of every group, `bs`), then the closure, then the gradients (a
    # sparse one anywhere refuses the whole step), the choice of implementation per
    # group and, for the fused kernel, its own checks (it is built, if need be, and
    # every tensor has a dtype, layout and device it takes), and only then the updates.
    #
    # This matters more for an optimizer than for most code. A step that raises halfway has
    # updated some parameters and not others, and the momentum of some and not others; the
    # caller cannot undo it (there is no copy of the old values), and a training loop that
    # catches the error and goes on trains a model whose layers are one step apart. So every
    # failure we can foresee is made to happen before the first write.
    #
    # `torch.amp.GradScaler` and fused optimizers have a contract: when the optimizer
    # says `_step_supports_amp_scaling`, the scaler does not unscale the gradients nor
    # skip the step itself; it sets `optimizer.grad_scale` (the loss scale) and
    # `optimizer.found_inf` (non-zero if any gradient overflowed) and calls `step()`.
    # The fused kernel then divides each gradient by the scale as it reads it, and skips
    # the whole step, without waiting for the device, when `found_inf` is set. A group
    # that is not fused (a mixed configuration) does the same with ordinary ops.
    #
    # The scaler forwards extra arguments, so `scaler.step(opt, bs=B)` reaches `step` with
    # its `bs`. After `scaler.unscale_(opt)` (to clip the gradient norm, as the reference
    # recipe does) the gradients are already unscaled: the scaler then sets `grad_scale` to
    # `None` and passes only `found_inf`.
    @torch.no_grad()
    def step(
        self, closure: Callable[[], Tensor] | None = None, bs: float = 5120
    ) -> Tensor | None:
        r"""Take one Sophia step; `bs` is $B$, the number of predictions behind the Hessian estimate."""
        # 1. The checks of the arguments and of every group, as they are now: a scheduler may
        #    have written a new `lr` since the last step. Nothing has been touched yet.
        _check_bs(bs)
        for gi, group in enumerate(self.param_groups):
            _check_group(group, where=f"param_groups[{gi}]: ", at_step=True)

        # 2. The closure, if any, re-evaluates the model and back-propagates. `step` runs under
        #    `torch.no_grad()`, so gradients are switched back on for it. Its gradients are the
        #    ones the step uses, so they are collected only after it.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # 3. The gradients (a sparse one refuses the step), the implementation of each group, and
        #    the kernel's own checks: the last chance to refuse.
        plan = self._plan(self._params_with_grad())
        # `GradScaler` sets these two attributes just before it calls `step()` and deletes them
        # just after; without a scaler they do not exist.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # The non-finite rule (see "Non-finite values"), over the gradients of every group at
        # once, still before the first write; not when a scaler has already looked
        # (`found_inf`), nor inside a CUDA graph capture.
        if found_inf is None and grad_scale is None and self._should_check():
            if not _all_finite([g for _, _, grads, _ in plan for g in grads]):
                if self.nonfinite == "skip":
                    self.skipped_steps += 1
                    return loss
                raise FloatingPointError(
                    f"SophiaG.step refused: {_describe_nonfinite(self._named_grads(), 'gradient')}; nothing was "
                    "changed (construct the optimizer with nonfinite='skip' to skip such steps instead)"
                )
        for group, params, grads, implementation in plan:
            # 4. The updates, group by group. A fused group hands the scale and the flag to the
            #    kernel, which unscales as it reads and skips the step on the device.
            extra = {}
            if implementation == "fused":
                extra = dict(grad_scale=grad_scale, found_inf=found_inf)
            # A group that is not fused does the same with ordinary ops. Reading the flag with
            # `.item()` waits for the device: that is the price of a mixed configuration, once per
            # step. A skipped group counts no step, as in the kernel, and creates no state. The
            # gradients are unscaled out of place, into new tensors, so that `p.grad` keeps the
            # scaled values the kernel would also have left in memory; the scale lives on the
            # scaler's device and is copied to the gradients'.
            elif found_inf is not None or grad_scale is not None:
                if found_inf is not None and bool(found_inf.item()):
                    continue
                if grad_scale is not None:
                    grads = torch._foreach_div(grads, grad_scale.to(grads[0].device))
            # State is created (zeros) for parameters stepping for the first time, then the chosen
            # function runs on the state lists in the reference's order. Only $\beta_1$ is passed:
            # $\beta_2$ belongs to the Hessian refresh.
            states = [self._state_for(p, group) for p in params]
            _step_function(implementation)(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["hessian"] for s in states],
                [s["step"] for s in states],
                lr=group["lr"],
                beta1=group["betas"][0],
                rho=group["rho"],
                bs=bs,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                **extra,
            )
        # Remembered for `win_rate()`, so that it measures the clip with the $B$ the steps used.
        self._last_bs = bs
        return loss

    # Per group with work to do: its implementation, and for the fused kernel, the
    # kernel's own checks, all before the first write.
    #
    # Every group is planned before any group is stepped: a refusal by the kernel in the
    # second group after the first was updated would be half a step. With `fused=None` on
    # CUDA, planning is also where the kernel is first built (`_implementation` asks whether
    # it can be), which takes a minute once and writes nothing of the optimizer's; with
    # `fused=True` the kernel is built (or found in the cache) here too, so that a
    # machine that cannot build it refuses the step before any group has moved.
    def _plan(
        self, groups: list[tuple[dict, list[Tensor], list[Tensor]]]
    ) -> list[tuple]:
        plan = []
        for group, params, tensors in groups:
            if not params:
                continue
            implementation = _implementation(group, params, tensors)
            # Only a group that asked for the kernel is checked here: with `fused=None`,
            # `_implementation` chose it because these same checks passed and the build
            # exists (`fused_supports`, `fused_available`), and repeating them would be a
            # second pass over every tensor on every step.
            if implementation == "fused" and group["fused"]:
                from .fused import check_fused_tensors, load_extension

                check_fused_tensors({"params": params, "grads or estimates": tensors})
                for device_type in sorted({p.device.type for p in params}):
                    load_extension(device_type)
            plan.append((group, params, tensors, implementation))
        return plan

    # The gradients with their place in `param_groups`, for the error message.
    def _named_grads(self) -> list[tuple[str, Tensor]]:
        return [
            (f"param_groups[{gi}]['params'][{pi}]", p.grad)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if p.grad is not None
        ]

    # Whether the non-finite rule looks at the inputs: not with `"unchecked"`, and not
    # while a CUDA graph is being captured (a read on the host is an error there).
    def _should_check(self) -> bool:
        if self.nonfinite == "unchecked":
            return False
        return not (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        )

    # ## The Hessian refresh
    #
    # `update_hessian()` with no argument is the authors' call: every parameter with a
    # gradient folds $\hat g \odot \hat g$ into its `hessian`, where $\hat g$ is the
    # gradient the caller just back-propagated from the sampled-label loss. With a
    # list, one entry per parameter of all groups in order (`None` skips one), the
    # entries are folded in as they are: that is how Hutchinson's estimates, or any
    # other estimator's, reach the optimizer. It may be called before the first
    # `step()`: the state is created with zeros.
    @torch.no_grad()
    def update_hessian(
        self,
        estimates: Sequence[Tensor | None] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        r"""Fold a Hessian-diagonal estimate into the EMA $h$: $h \leftarrow \beta_2 h + (1-\beta_2)\hat h$.

        `scaler`: the `torch.amp.GradScaler` that scaled the sampled-label loss before
        its backward pass; its scale $s$ is divided out of $\hat g$ before squaring, and a
        refresh whose gradients overflowed is skipped (counted in `skipped_refreshes`).
        """
        # The groups are checked first: $\beta_2$ is read from them, and a scheduler may have
        # edited them since the constructor.
        for gi, group in enumerate(self.param_groups):
            _check_group(group, where=f"param_groups[{gi}]: ", at_step=True)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
            )
        # The two sources of $\hat h$: the gradients in `p.grad` (the authors' call, squared as
        # they are folded in) or the list the caller passes (folded in as given).
        if estimates is None:
            groups = self._params_with_grad()
            square = True
        else:
            # A generator of estimates is read once, here, so that the error message below can
            # name an entry.
            if isinstance(estimates, Iterable) and not isinstance(estimates, Tensor):
                estimates = list(estimates)
            if scaler is not None:
                raise ValueError(
                    "scaler= applies to the gradients in p.grad, not to estimates=: unscale them yourself"
                )
            groups = self._match_estimates(estimates)
            square = False
        plan = self._plan(groups)

        # ### Under a `GradScaler`
        #
        # The scaler wraps `step()` only; the refresh is ours to unscale. With mixed precision
        # (`float16`) the sampled-label loss is scaled like the training loss, by $s$, so that
        # small gradients do not underflow in the backward pass: `p.grad` then holds
        # $s\,\hat g$, and folding it in as it is would make $h$ too large by $s^2$ (and every
        # step $s^2$ times too timid). So the gradients are divided by $s$ first, into new
        # tensors (`p.grad` is left as it is). The scaler's $s$ is a power of two, so the
        # division is exact. Reading $s$ waits for the device, once per refresh.
        #
        # A scaled backward pass that overflowed leaves an infinity or a NaN in some $s\,\hat g$:
        # the scaler would skip such a step, and the refresh is skipped the same way, whatever
        # `nonfinite` says (an overflow is what a scaler expects, not an error). The scaler's
        # $s$ is not lowered by it: that happens at the next overflow of a training step, when
        # `scaler.update()` sees it.
        if scaler is not None and scaler.is_enabled() and square:
            inv_scale = 1.0 / scaler.get_scale()
            plan = [
                (group, params, torch._foreach_mul(list(tensors), inv_scale), impl)
                for group, params, tensors, impl in plan
            ]
            if not _all_finite([t for _, _, tensors, _ in plan for t in tensors]):
                self.skipped_refreshes += 1
                return
        # Without a scaler, the non-finite rule of the step applies to the estimates: refuse
        # (naming the parameter) or skip, before anything is folded in. A NaN folded into $h$
        # would stay there for good ($\beta_2 \cdot \text{NaN}$ is NaN), and every later step
        # of that coordinate would write a NaN.
        elif self._should_check() and not _all_finite(
            [t for _, _, tensors, _ in plan for t in tensors]
        ):
            if self.nonfinite == "skip":
                self.skipped_refreshes += 1
                return
            named = (
                self._named_grads()
                if square
                else [
                    (f"estimates[{i}]", e)
                    for i, e in enumerate(estimates)
                    if e is not None
                ]
            )
            raise FloatingPointError(
                f"{type(self).__name__}.update_hessian refused: "
                f"{_describe_nonfinite(named, 'gradient' if square else 'Hessian estimate')}; h was not changed "
                "(construct the optimizer with nonfinite='skip' to skip such refreshes instead)"
            )

        # Each group folds its estimates with its own $\beta_2$ and its own implementation. The
        # step counter does not move: a refresh is not a step.
        for group, params, ests, implementation in plan:
            hessians = [self._state_for(p, group)["hessian"] for p in params]
            _hessian_function(implementation)(
                hessians, ests, beta2=group["betas"][1], square=square
            )

    # The estimates must line up with the parameters one to one: same count, same
    # shape, same device, real for a real parameter and complex for a complex one,
    # floating point, dense. All are checked before any is folded in.
    #
    # "In order" means the order of the parameters in `param_groups`, group after group:
    # for an optimizer built from `model.parameters()`, the order of `model.parameters()`.
    # A single tensor is refused rather than iterated over (which would silently yield its
    # rows). Estimates are matched to parameters, not to gradients, so a parameter without
    # a gradient can still be refreshed.
    def _match_estimates(
        self, estimates: Sequence[Tensor | None]
    ) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        if isinstance(estimates, Tensor) or not isinstance(estimates, Iterable):
            raise TypeError(
                "estimates must be a list with one tensor (or None) per parameter, "
                f"got {type(estimates).__name__}"
            )
        estimates = list(estimates)
        n_params = sum(len(group["params"]) for group in self.param_groups)
        if len(estimates) != n_params:
            raise ValueError(
                f"estimates has {len(estimates)} entries but the optimizer has {n_params} parameters "
                "(one entry per parameter of all groups, in order; None to skip one)"
            )
        plan, index = [], 0
        for group in self.param_groups:
            params, ests = [], []
            for p in group["params"]:
                est = estimates[index]
                if est is not None:
                    _check_estimate(index, est, p)
                    params.append(p)
                    ests.append(est)
                index += 1
            plan.append((group, params, ests))
        return plan

    # ## Diagnostics: the clip win rate
    #
    # The fraction of coordinates that are *not* clipped, $|m| < \max(\rho B h,
    # \epsilon)$, computed from the current state as the reference training loop does
    # (it logs it right after `update_hessian()`). `bs` defaults to the `bs` of the last
    # step. The reference README tunes $\rho$ so that this stays in 0.1 to 0.5: near 0,
    # Sophia is sign-momentum; near 1, the clip never acts.
    @torch.no_grad()
    def win_rate(self, bs: float | None = None) -> float:
        r"""Fraction of coordinates with $|m| < \max(\rho B h, \epsilon)$, i.e. not clipped."""
        # Without an argument, the $B$ of the last step; before any step there is none, and a
        # silent default would give a meaningless rate.
        if bs is None:
            bs = self._last_bs
        if bs is None:
            raise RuntimeError("win_rate() needs B: call step() first, or pass bs=")
        _check_bs(bs)
        # Every group is counted with its own $\rho$ and $\epsilon$, over the parameters that
        # have state, by the reference counter whatever the group's implementation: this is a
        # diagnostic, run every $k$ steps at most. It reads its counts back to the host, so it
        # waits for the device: keep it out of a captured CUDA graph and out of the hot loop.
        #
        # Under FSDP the state is sharded: each process counts the coordinates of its own
        # shards, and the counts are summed over the processes that hold the other shards
        # (the mesh dimensions along which the tensor is sharded, not those along which it
        # is replicated), once per kind of sharding. Every process then reports the rate of
        # the whole model.
        counts: dict[tuple, list[int]] = {}
        meshes: dict[tuple, Any] = {}
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p]
                if "exp_avg" not in s:
                    continue
                key: tuple = ()
                if hasattr(s["exp_avg"], "device_mesh"):
                    mesh = s["exp_avg"].device_mesh
                    key = (
                        id(mesh),
                        tuple(
                            d
                            for d, pl in enumerate(s["exp_avg"].placements)
                            if pl.is_shard()
                        ),
                    )
                    meshes[key] = mesh
                u, n = unclipped_count_reference(
                    [_local(s["exp_avg"])],
                    [_local(s["hessian"])],
                    rho=group["rho"],
                    bs=bs,
                    eps=group["eps"],
                )
                c = counts.setdefault(key, [0, 0])
                c[0] += u
                c[1] += n
        unclipped, total = 0, 0
        for key, (u, n) in counts.items():
            if key:
                mesh = meshes[key]
                both = torch.tensor([u, n], dtype=torch.int64, device=mesh.device_type)
                for dim in key[1]:
                    dist.all_reduce(
                        both, op=dist.ReduceOp.SUM, group=mesh.get_group(dim)
                    )
                u, n = (int(v) for v in both.tolist())
            unclipped += u
            total += n
        if total == 0:
            raise RuntimeError(
                "win_rate() has no optimizer state to measure: take a step first"
            )
        return unclipped / total


# ## Checking one estimate
#
# What each check prevents. A shape that differs would *broadcast* (a scalar estimate
# folded into every coordinate) instead of failing; an estimate on another device would
# fail partway through the fold, after other estimates were folded in; a sparse estimate has
# no dense counterpart in the state; an integer one is not an estimate; a real estimate
# for a complex parameter (or the reverse) does not match its real view (see the
# [reference](reference.html)).
def _check_estimate(index: int, est: Any, p: Tensor) -> None:
    where = f"estimates[{index}]"
    if not isinstance(est, Tensor):
        raise TypeError(f"{where} must be a tensor or None, got {type(est).__name__}")
    if est.shape != p.shape:
        raise ValueError(
            f"{where} has shape {tuple(est.shape)} but its parameter has shape {tuple(p.shape)}"
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


# ## Checking a loaded state tensor
#
# One entry (`exp_avg` or `hessian`) of a loaded state against its parameter. Under FSDP
# both may be `DTensor`s: their `shape` is the whole parameter's, and the values checked
# are this process's shard.
def _check_loaded(where: str, name: str, value: Any, p: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(
            f"loaded state of {where}: '{name}' must be a tensor, got {type(value).__name__}"
        )
    if not (value.is_floating_point() or value.is_complex()):
        raise ValueError(
            f"loaded state of {where}: '{name}' has dtype {value.dtype}, not a floating-point type"
        )
    if value.shape != p.shape:
        raise ValueError(
            f"loaded state of {where}: '{name}' has shape {tuple(value.shape)} but the parameter has shape "
            f"{tuple(p.shape)} (a checkpoint of another model, or parameters in another order?)"
        )
    local = _local(value)
    if name == "hessian":
        if bool(torch.isnan(local).any()):
            raise ValueError(f"loaded state of {where}: 'hessian' holds NaN")
    elif not bool(torch.isfinite(local).all()):
        raise ValueError(
            f"loaded state of {where}: '{name}' holds non-finite values (NaN or inf)"
        )


class SophiaH(SophiaG):
    r"""Sophia with Hutchinson's estimator (Sophia-H), one import away.

    The same update as `SophiaG`; what differs is the estimate. Hutchinson's
    $\hat h = u \odot (\nabla^2 L\, u)$ estimates the Hessian diagonal of the loss
    itself, so it needs no factor $B$: `step()` defaults to `bs=1`, and the stored
    `hessian` is the paper's $h$. Every $k$ steps, pass a loss whose graph is still alive
    (built with gradients enabled, not yet back-propagated without `retain_graph`):
    `opt.update_hessian(loss=loss)`; or pass estimates you computed yourself.

    Defaults: the authors publish no PyTorch defaults for Sophia-H. We keep `SophiaG`'s
    (`lr=1e-4`, `betas=(0.965, 0.99)`, `rho=0.04`, `weight_decay=0.1`) because with
    `bs=1` the two optimizers see the same quantity $h$, an estimate of the same
    Hessian diagonal. `n_samples` probes (default 1, as in the paper) of the
    `distribution` (`"rademacher"`, the lower-variance choice, or `"gaussian"`) are
    averaged per refresh.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        n_samples: int = 1,
        distribution: str = "rademacher",
        maximize: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        eps: float = 1e-15,
        nonfinite: str = "raise",
    ) -> None:
        # The estimator's own settings are checked before `SophiaG.__init__` runs, so a refused
        # `SophiaH` leaves nothing half-built. They are attributes, not group settings: they
        # describe the estimator, which runs over all groups at once. Being attributes, they are
        # not in `state_dict()`: to resume, construct the optimizer with the same arguments.
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
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            fused=fused,
            eps=eps,
            nonfinite=nonfinite,
        )
        self.n_samples = n_samples
        self.distribution = distribution

    def step(
        self, closure: Callable[[], Tensor] | None = None, bs: float = 1
    ) -> Tensor | None:
        r"""Take one Sophia step; with Hutchinson's estimates $B = 1$."""
        # The same step as `SophiaG`; only the default `bs` differs, because Hutchinson's
        # $\hat h$ already estimates the paper's $h$.
        return super().step(closure, bs=bs)

    # With `loss=`, the estimate is computed here, over every parameter that requires
    # a gradient. A group with `maximize=True` maximizes the loss, i.e. minimizes
    # $-L$, whose Hessian is $-\nabla^2 L$: its estimates are negated, so that $h$ is
    # always the curvature of the quantity being minimized.
    def update_hessian(
        self,
        estimates: Sequence[Tensor | None] | None = None,
        *,
        loss: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        r"""Fold Hutchinson's estimate of $\operatorname{diag}\nabla^2 L$ (from `loss=`) or given `estimates` into $h$."""
        # Exactly one source of estimates: both would be ambiguous, neither is a mistake.
        if (estimates is None) == (loss is None):
            raise ValueError(
                "SophiaH.update_hessian needs exactly one of estimates= or loss="
            )
        if loss is not None:
            for gi, group in enumerate(self.param_groups):
                _check_group(group, where=f"param_groups[{gi}]: ", at_step=True)
            # All parameters in `_match_estimates`' order, with the sign of each one's group.
            # Parameters that do not require a gradient are not probed (the loss has no gradient
            # with respect to them) and get `None`, i.e. no refresh.
            params = [p for group in self.param_groups for p in group["params"]]
            signs = [
                -1.0 if group["maximize"] else 1.0
                for group in self.param_groups
                for _ in group["params"]
            ]
            trainable = [p for p in params if p.requires_grad]
            # Hutchinson's product $H u = \nabla_\theta \langle \nabla_\theta L, u\rangle$ is a double
            # backward, which needs gradient mode even if the caller is under `torch.no_grad()`.
            with torch.enable_grad():
                found = iter(
                    hutchinson(
                        loss,
                        trainable,
                        n_samples=self.n_samples,
                        distribution=self.distribution,
                        generator=generator,
                    )
                )
            # Back to one entry per parameter, negated for the groups that maximize.
            estimates = [
                (next(found) * sign) if p.requires_grad else None
                for p, sign in zip(params, signs)
            ]
        # Folded in like any caller's estimates: checked, then $h \leftarrow \beta_2 h + (1 -
        # \beta_2)\hat h$ per group.
        super().update_hessian(estimates)
