r"""
---
title: Non-finite gradients and estimates
summary: One read of every gradient for NaNs and infinities; the step skipped on the device, or refused before any write.
---

A NaN in one gradient, folded into $m$ or $h$, stays there for good, so the
[optimizer](optimizer.html) looks for NaNs and infinities before it writes anything
(`nonfinite="raise"`, the default, or `"skip"`; `"unchecked"` does not look). This
module is that search and what follows from it:

* **the flag**: one pass that reads every gradient once, at the speed of memory, and
  leaves a `float32` flag per device, non-zero if any element is not finite
  (`found_nonfinite`);
* **the decision**: on the CPU, and with the reference, the flag is read at once, and
  the step raises or is skipped before any write; on CUDA with foreach (the default)
  or `fused=True` it is *not* read: the step takes it as `found_inf`, as the kernel
  takes a `GradScaler`'s, and skips itself on the device, and the skipped steps are
  counted and reported at the next point that waits for the device anyway (see
  [the rule](../engineering/optimizer.md#non-finite-values));
* **the messages**, which name the first bad tensor and how many of its values are bad.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .checks import _agree_across_shards, _local

# The storage types the multi-tensor check takes; a complex tensor goes as its real
# view.
CHECKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ## The flag
#
# Two passes can make it, each reading every element once and setting the device's
# flag with no wait for the device:
#
# * with `kernel=True` (every group of the step fused), the
#   [fused kernel's own check](fused.html#the-non-finite-check), which reads and does
#   not write, so it moves a sixth of a fused step's bytes;
# * otherwise `torch._amp_foreach_non_finite_check_and_unscale_`, the pass a
#   `GradScaler` makes, with a scale of one: per `(device, dtype)`, one multi-tensor
#   pass. It also stores every finite value back, bit for bit (the multiplication is
#   not done; a half-precision NaN may come back as another NaN), so it is given only
#   tensors it may store into.
#
# A tensor neither takes (not contiguous, or an inference tensor for the second) is
# checked out of place.
def found_nonfinite(
    tensors: Sequence[Tensor], *, kernel: bool = False
) -> dict[torch.device, Tensor]:
    r"""Per device, a one-element `float32` tensor, non-zero if an element of
    `tensors` on that device is NaN or infinite. Does not wait for the device."""
    flags: dict[torch.device, Tensor] = {}
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        local = _local(t)
        local = torch.view_as_real(local) if local.is_complex() else local
        flag = flags.setdefault(
            local.device, torch.zeros(1, dtype=torch.float32, device=local.device)
        )
        pass_takes_it = (
            local.dtype in CHECKED_DTYPES
            and local.is_contiguous()
            and (kernel or not local.is_inference())
        )
        if pass_takes_it:
            groups.setdefault((local.device, local.dtype), []).append(local)
        elif local.numel():
            flag.add_((~torch.isfinite(local)).any())
    for (device, _dtype), group in groups.items():
        if kernel:
            from .fused import nonfinite_check_fused

            nonfinite_check_fused(group, flags[device])
            continue
        one = torch.ones(1, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flags[device], one)
    return flags


# `True` if every element of every tensor is finite: the flags read on the host (one
# wait per device), and, under FSDP, agreed by every process that holds a shard.
def _all_finite(tensors: Sequence[Tensor], *, kernel: bool = False) -> bool:
    if not tensors:
        return True
    flags = found_nonfinite(tensors, kernel=kernel)
    found = torch.stack([f.reshape(()).cpu() for f in flags.values()]).max()
    found = (found != 0).float()
    found = _agree_across_shards(found, tensors)
    return not bool(found)


# ## The decision
#
# Whether the rule looks at the inputs: not with `"unchecked"`, and not inside a CUDA
# graph capture (a read on the host is an error there).
def should_check(nonfinite: str) -> bool:
    if nonfinite == "unchecked":
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# Whether every group of a plan is fused, so that the kernel's check may look.
def all_fused(plan: list[tuple]) -> bool:
    return all(impl == "fused" for _, _, _, impl in plan)


# The rule over the planned tensors of a step or of a refresh (`refresh`), for
# `optimizer`: `False` to go on, `True` to skip (counted), or a `FloatingPointError`
# naming the first bad gradient, or entry of `estimates` when given.
def skip_nonfinite(
    optimizer: Any, plan: list[tuple], *, refresh: bool, estimates: list | None = None
) -> bool:
    tensors = [t for _, _, group_tensors, _ in plan for t in group_tensors]
    if not should_check(optimizer.nonfinite):
        return False
    if _all_finite(tensors, kernel=all_fused(plan)):
        return False
    if optimizer.nonfinite == "skip":
        if refresh:
            optimizer.skipped_refreshes += 1
        else:
            optimizer.skipped_steps += 1
        return True
    if estimates is None:
        named, what = _named_grads(optimizer.param_groups), "gradient"
    else:
        named, what = _named_estimates(estimates), "Hessian estimate"
    if refresh:
        call = f"{type(optimizer).__name__}.update_hessian"
        raise _nonfinite_error(call, named, what, "h was not changed", "refreshes")
    raise _nonfinite_error("SophiaG.step", named, what, "nothing was changed", "steps")


# ## On the device
#
# On CUDA, when every group is fused or foreach and every tensor is a plain tensor on
# one device, the flag is not read: it goes to the step as `found_inf` (the kernel's,
# or the [foreach step's](foreach.html#a-step-the-device-may-skip)), which then changes
# nothing, and the step is recorded on the optimizer to be settled later. A foreach
# step's counters on the CPU cannot follow a flag on the device without a wait: the
# optimizer counts them every step, and the record keeps them, to take the skipped
# steps back off.
# `DEVICE_SIDE` is where this is done; the tests add `"cpu"` to run it here. Sharded
# tensors keep the host rule, whose processes must agree before any write, and so
# does the reference (`foreach=False`): it is the spec, kept to the paper's lines.
DEVICE_SIDE = {"cuda"}

# The most steps a record holds: the next step settles them first, one wait per this
# many steps, so that a loop that never reaches a sync point neither grows the record
# nor hears of a NaN later than this.
SETTLE_EVERY = 100


def device_flag(optimizer: Any, plan: list[tuple]) -> Tensor | None:
    r"""The flag to hand to the step, or `None` where the host decides."""
    tensors = [t for _, _, group_tensors, _ in plan for t in group_tensors]
    devices = {t.device for t in tensors}
    if (
        not tensors
        or not should_check(optimizer.nonfinite)
        or len(devices) != 1
        or next(iter(devices)).type not in DEVICE_SIDE
        or any(impl not in ("fused", "foreach") for _, _, _, impl in plan)
        or any(hasattr(t, "device_mesh") for t in tensors)
    ):
        return None
    if len(optimizer.__dict__.get("_device_skips", ())) >= SETTLE_EVERY:
        settle_device_skips(optimizer)
    (flag,) = found_nonfinite(tensors, kernel=all_fused(plan)).values()
    return flag


# A step taken with `flag`, and the counters it counted whatever the flag said.
def record_device_step(optimizer: Any, flag: Tensor, counted: list[Tensor]) -> None:
    optimizer.__dict__.setdefault("_device_skips", []).append((flag, counted))


# The record, read in one wait at the next call that waits for the device anyway
# (`win_rate()`, `state_dict()`, `update_hessian()`, reading `skipped_steps`, or the
# step after `SETTLE_EVERY` of them): the counters of each skipped step lose the count
# they should not have had, then the skipped steps are counted in `skipped_steps`
# under `"skip"`, or raise a `FloatingPointError` under `"raise"`. Either way those
# steps changed nothing.
def settle_device_skips(optimizer: Any) -> None:
    records = optimizer.__dict__.pop("_device_skips", None)
    if not records:
        return
    flags = torch.cat([flag.reshape(1) for flag, _ in records])
    skipped = (flags != 0).tolist()
    for was_skipped, (_, counted) in zip(skipped, records):
        if was_skipped and counted:
            torch._foreach_sub_(counted, 1)
    n = sum(skipped)
    if n == 0:
        return
    if optimizer.nonfinite == "skip":
        optimizer._skipped_steps += n
        return
    raise FloatingPointError(
        f"{n} step(s) of {type(optimizer).__name__} since the last check were "
        "skipped on the device: a gradient held NaN or inf, and those steps changed "
        "nothing (construct the optimizer with nonfinite='skip' to count them in "
        "skipped_steps instead)"
    )


# The slow path, taken only once something was found: which parameter, and how many of
# its values. Under FSDP another process may hold the bad shard, and the message says
# so.
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
                f"{name} has a {what} with {n_bad} non-finite value(s) "
                f"({' and '.join(kinds)}) of {local.numel()} "
                f"(shape {tuple(t.shape)}, dtype {t.dtype})"
            )
    return f"a {what} on another process holds non-finite values"


# The refusal under `nonfinite="raise"`: what was refused (`call`), the first bad
# tensor of `named`, what did not change, and how to skip such calls instead
# (`skipped`: "steps" or "refreshes").
def _nonfinite_error(
    call: str,
    named: Sequence[tuple[str, Tensor]],
    what: str,
    unchanged: str,
    skipped: str,
) -> FloatingPointError:
    return FloatingPointError(
        f"{call} refused: {_describe_nonfinite(named, what)}; {unchanged} "
        "(construct the optimizer with nonfinite='skip' "
        f"to skip such {skipped} instead)"
    )


# The gradients and the estimates, with their place, for the error message.
def _named_grads(param_groups: list[dict]) -> list[tuple[str, Tensor]]:
    return [
        (f"param_groups[{gi}]['params'][{pi}]", p.grad)
        for gi, group in enumerate(param_groups)
        for pi, p in enumerate(group["params"])
        if p.grad is not None
    ]


def _named_estimates(estimates: list) -> list[tuple[str, Tensor]]:
    return [(f"estimates[{i}]", e) for i, e in enumerate(estimates) if e is not None]
