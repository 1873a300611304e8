r"""
---
title: Sophia, the fused kernel
summary: The reference step in one pass over memory, by a kernel for CUDA and the CPU.
---

The [reference](reference.html) makes one pass over memory per operation, and the
[foreach version](foreach.html) only batches those passes into fewer launches. The
[fused kernel](csrc/sophia_kernel.html) does the whole step in *one* pass: it reads
`param`, `grad`, `exp_avg` and `hessian` once per element, computes in registers, and
writes `param` and `exp_avg` once. The statements inside it are the reference's, in
the same order, with the same names.

This module is the Python side: it **checks** every tensor before anything is written
(`check_fused_tensors`), with errors that name the tensor and say what it is, and
**calls** the kernel once per `(device, dtype)` group, like the foreach version
(`sophiag_fused`, `hessian_ema_fused`). The kernel is compiled on first use by
[`fused_build`](fused_build.html), in a CUDA build and a CPU build of the same source.

The kernel rounds where the reference rounds, so on the CPU it agrees with the
reference **bit for bit** in all four storage types (the tests assert it on x86 CPUs,
where PyTorch's kernels use fused multiply-adds); what we promise elsewhere is what one
extra rounding per operation could cost, a relative $10^{-6}$ per element and step in
`float32`. Beyond the reference's contract it takes `grad_scale` and `found_inf` (the
contract of `torch.amp.GradScaler` with fused optimizers: a non-zero flag changes
nothing at all), an `lr` tensor read from device memory (so a captured CUDA graph
follows a schedule), and FSDP's sharded tensors. How each of these works, and what it
costs, is on [how the fused kernel is built](../engineering/kernel.md).
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

# The kernel groups tensors and counts steps with the foreach version's own functions,
# and views complex tensors as real with the reference's `_as_real`: one definition of
# each.
from .foreach import count_steps, group_by_device_and_dtype
from .fused_build import FusedUnavailableError, fused_available, load_extension
from .reference import _as_real

__all__ = [
    "COMPLEX_DTYPES",
    "STORAGE_DTYPES",
    "FusedUnavailableError",
    "check_fused_tensors",
    "fused_available",
    "fused_supports",
    "hessian_ema_fused",
    "load_extension",
    "nonfinite_check_fused",
    "sophiag_fused",
]


# ## Checking the input
#
# The kernel takes dense, contiguous tensors of a storage type the launcher has a code
# for, on the CPU or a CUDA device; a complex tensor goes as its real view. Every check
# is here, before the first write; the binding repeats only those it needs to stay
# within each tensor's memory.
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


# Enough to find the tensor in the model, and to see what is wrong with it.
def _describe(t: Tensor) -> str:
    text = (
        f"dtype {t.dtype}, device {t.device}, layout {t.layout}, shape {tuple(t.shape)}"
    )
    if t.layout == torch.strided:
        text += f", strides {t.stride()}"
    return text


# In the order in which each check makes the next meaningful.
def _check_tensor(name: str, i: int, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(
            f"{name}[{i}] has layout {t.layout} ({_describe(t)}); "
            "the fused kernel takes dense tensors"
        )
    # A device with no build (`mps`, `meta`) is a `RuntimeError`, as in PyTorch.
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{name}[{i}] is on device {t.device} ({_describe(t)}); the fused kernel "
            "runs on cuda, and on cpu through its CPU build"
        )
    if t.dtype not in STORAGE_DTYPES + COMPLEX_DTYPES:
        raise TypeError(
            f"{name}[{i}] has dtype {t.dtype} ({_describe(t)}); the fused kernel takes "
            "torch.float32, torch.float16, torch.bfloat16, torch.float64, and "
            "torch.complex64/128 as pairs of reals"
        )
    # An inference tensor cannot be written in place outside `torch.inference_mode()`.
    if t.is_inference():
        raise RuntimeError(
            f"{name}[{i}] is an inference tensor ({_describe(t)}); "
            "the optimizer cannot update it in place"
        )
    # A lazy view only marks its memory as conjugated or negated; the kernel reads raw
    # memory and would miss the mark.
    if t.is_conj() or t.is_neg():
        raise ValueError(
            f"{name}[{i}] is a lazy conjugated or negated view ({_describe(t)}); "
            "call .resolve_conj() / .resolve_neg() first"
        )
    # The kernel reads element $i$ at the data pointer plus $i$.
    if not t.is_contiguous():
        raise ValueError(
            f"{name}[{i}] is not contiguous ({_describe(t)}); the fused kernel needs "
            "contiguous tensors (foreach=True takes any strides)"
        )


def check_fused_tensors(tensors_by_name: dict[str, list[Tensor]]) -> None:
    r"""Raise if the fused kernel cannot take a tensor of `tensors_by_name`.

    The error is a `TypeError`, `ValueError` or `RuntimeError`. `tensors_by_name`
    maps a name for the error messages ("params", "grads", ...) to a list of tensors.
    Each tensor is checked on its own: dtype, layout, device, contiguity.
    """
    for name, tensors in tensors_by_name.items():
        for i, t in enumerate(tensors):
            _check_tensor(name, i, t)


def fused_supports(tensors: list[Tensor]) -> bool:
    r"""True if the fused kernel takes every tensor of `tensors`. Never raises."""
    try:
        check_fused_tensors({"tensors": list(tensors)})
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


# The lists of one call are parallel: at each index, one device and shape and, for the
# step (`same_dtype`), one dtype, since a launch has one storage type. `first` names
# the list the others are compared with; lengths first, so that indexing is safe.
def _check_parallel(lists: dict[str, list], first: str, *, same_dtype: bool) -> None:
    n = len(lists[first])
    for name, tensors in lists.items():
        if len(tensors) != n:
            raise ValueError(f"{name} has {len(tensors)} tensors but {first} has {n}")
    for i, ref in enumerate(lists[first]):
        for name, tensors in lists.items():
            t = tensors[i]
            if t.device != ref.device:
                raise ValueError(
                    f"{name}[{i}] is on {t.device} but {first}[{i}] is on {ref.device}"
                )
            if t.shape != ref.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but {first}[{i}] has "
                    f"{tuple(ref.shape)}"
                )
            if same_dtype and t.dtype != ref.dtype:
                raise TypeError(
                    f"{name}[{i}] has dtype {t.dtype} but {first}[{i}] has "
                    f"{ref.dtype}; the fused kernel needs a parameter and its state in "
                    "one dtype"
                )
            if t.is_complex() != ref.is_complex():
                raise TypeError(
                    f"{name}[{i}] has dtype {t.dtype} but {first}[{i}] has "
                    f"{ref.dtype} (complex and real)"
                )


# `lr`, `grad_scale`, `found_inf`: a Python number, or a tensor with one floating-point
# value, since the kernel reads one `float32` from its address.
def _check_one_value(name: str, value: Any) -> None:
    if isinstance(value, Tensor) and (
        value.numel() != 1 or not value.is_floating_point()
    ):
        raise ValueError(
            f"{name} as a tensor must hold one floating-point value, "
            f"got {_describe(value)}"
        )


# The step's checks: every tensor, the four lists against each other, one counter per
# parameter (the counters never reach the kernel), and the scalars.
def _check_step(lists: dict[str, list], state_steps: list, **scalars: Any) -> None:
    check_fused_tensors(lists)
    _check_parallel(lists, "params", same_dtype=True)
    n = len(lists["params"])
    if len(state_steps) != n or not all(isinstance(s, Tensor) for s in state_steps):
        raise TypeError(f"state_steps must be {n} tensors, one per parameter")
    for name, value in scalars.items():
        _check_one_value(name, value)


# The builds for the devices of `tensors`, in sorted order so that two runs report the
# same first failure. `load_extension` is looked up here, in this module, at each call.
def _extensions(tensors: list[Tensor]) -> dict[str, ModuleType]:
    return {
        device_type: load_extension(device_type)
        for device_type in sorted({t.device.type for t in tensors})
    }


# ## Sharded tensors (FSDP)
#
# The step is elementwise, so the step of a `DTensor` is the step of each process's
# shard (`to_local()`, which shares its memory), provided that the tensors of an index
# are sharded alike: same mesh, same placements.
def _is_dtensor(t: Any) -> bool:
    return (
        isinstance(t, Tensor) and hasattr(t, "device_mesh") and hasattr(t, "to_local")
    )


def _shards(lists: dict[str, list]) -> dict[str, list]:
    names = list(lists)
    tensors = [t for ts in lists.values() for t in ts]
    if not any(_is_dtensor(t) for t in tensors):
        return lists
    # Each list's tensor against the parameter's, as far as the shortest list goes
    # (`_check_parallel` refuses a difference in length).
    for i in range(min(len(ts) for ts in lists.values())):
        first = lists[names[0]][i]
        for name in names:
            t = lists[name][i]
            if not (_is_dtensor(first) and _is_dtensor(t)):
                raise TypeError(
                    f"{name}[{i}] and {names[0]}[{i}] must both be DTensors or both "
                    "plain tensors"
                )
            if t.device_mesh != first.device_mesh or tuple(t.placements) != tuple(
                first.placements
            ):
                raise ValueError(
                    f"{name}[{i}] is sharded as {tuple(t.placements)} but "
                    f"{names[0]}[{i}] as {tuple(first.placements)}; the fused kernel "
                    "steps matching shards only"
                )
    return {
        name: [t.to_local() if _is_dtensor(t) else t for t in ts]
        for name, ts in lists.items()
    }


# ## Scalars on the right device
#
# `grad_scale`, `found_inf` and a tensor `lr` reach the kernel as one `float32` in the
# group's device memory. A tensor that already is one is passed as itself (no copy), so
# a captured CUDA graph reads the caller's memory at each replay.
def _on_device(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32, non_blocking=device.type == "cuda")


# The learning rate as `(lr_value, lr_tensor)`: a number goes by value, and so does a
# CPU tensor for a GPU group (read on the host, frozen into a captured graph); any other
# tensor goes by address.
def _lr_for(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    if not isinstance(lr, Tensor):
        return float(lr), None
    if lr.device.type == "cpu" and device.type != "cpu":
        return float(lr.item()), None
    return 0.0, _on_device(lr, device)


# The kernel runs on PyTorch's current stream for the device, under its guard, so it is
# ordered after the backward pass and captured with the stream. The CPU has no stream.
def _stream_and_device(
    device: torch.device,
) -> tuple[int, contextlib.AbstractContextManager]:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream, torch.cuda.device(device)
    return 0, contextlib.nullcontext()


# The kernel writes behind autograd's back: bump the versions, as an in-place op does,
# where this PyTorch has `increment_version`.
def _mark_written(tensors: list[Tensor]) -> None:
    increment_version = getattr(torch.autograd.graph, "increment_version", None)
    if increment_version is not None:
        for t in tensors:
            increment_version(t)


# ## The step
#
# Same arguments and contract as `sophiag_reference`, plus `grad_scale` and
# `found_inf`; `lr` may be a tensor. Every check, then the builds, then the copies of
# the scalars: nothing of the caller's is written before the step counters.
def sophiag_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    rho: float,
    bs: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    r"""One Sophia step on every tensor of `params` with the fused kernel, in place."""
    lists = _shards(
        dict(params=params, grads=grads, exp_avgs=exp_avgs, hessians=hessians)
    )
    _check_step(lists, state_steps, lr=lr, grad_scale=grad_scale, found_inf=found_inf)
    if not params:
        return
    # A flag that is a Python number (`GradScaler`'s sum of no flags is the number 0):
    # non-zero skips the whole call, zero is no flag.
    if found_inf is not None and not isinstance(found_inf, Tensor):
        if found_inf:
            return
        found_inf = None
    extensions = _extensions(lists["params"])

    # Reference: the loop over tensors, here one kernel call per `(device, dtype)`
    # group, complex tensors viewed as real, each with its scalars on its device.
    groups = group_by_device_and_dtype(
        *[[_as_real(t) for t in tensors] for tensors in lists.values()]
    )
    calls = []
    for group in groups.values():
        device = group[0][0].device
        scale, inf = [
            None if t is None else _on_device(t, device)
            for t in (grad_scale, found_inf)
        ]
        calls.append((group, device, *_lr_for(lr, device), scale, inf))

    # Reference: `step += 1`, the first write, counted only if the step happens.
    count_steps(state_steps, found_inf)

    # Reference: the step's statements (Algorithm 3, lines 6, 11 and 12), for every
    # element of the group, in one kernel call; `rho * bs` is the reference's Python
    # product (kept in the working range by the kernel, as by the reference), and
    # `maximize` is negated as the gradient is read.
    hyper = (beta1, rho * bs, weight_decay, eps, maximize)
    for group, device, lr_value, lr_tensor, scale, inf in calls:
        stream, on_device = _stream_and_device(device)
        with on_device:
            extensions[device.type].fused_step(
                group, lr_value, lr_tensor, *hyper, scale, inf, stream
            )
    # `param` and `exp_avg` were written; `grad` and `hessian` only read.
    _mark_written(lists["params"] + lists["exp_avgs"])


# ## The non-finite check
#
# Before a step, the [non-finite rule](nonfinite.html) asks whether a gradient holds a
# NaN or an infinity. For fused groups the kernel's own check answers: one read of
# each gradient, no write but the flag, which `sophiag_fused` then takes as
# `found_inf`. The caller has grouped the tensors by device and dtype, checked them
# (plain, contiguous, of a storage dtype) and zeroed `found`.
def nonfinite_check_fused(tensors: list[Tensor], found: Tensor) -> None:
    r"""Set `found` (one `float32` on the tensors' device) to one if an element of
    `tensors`, all of one device and dtype, is NaN or infinite; otherwise leave it as
    it is."""
    if not tensors:
        return
    device = tensors[0].device
    extension = _extensions(tensors[:1])[device.type]
    stream, on_device = _stream_and_device(device)
    with on_device:
        extension.nonfinite_check(tensors, found, stream)


# ## The Hessian EMA
#
# Same contract as `hessian_ema_reference`. A launch has one storage type, so an
# estimate of another dtype is first converted to its Hessian's: exact upward; downward
# (a `float32` estimate into a `bfloat16` Hessian) it rounds the estimate once, a
# relative change of at most $2^{-9}$, so the stored Hessian can differ from the
# reference's in its last bit.
def hessian_ema_fused(
    hessians: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: float,
    square: bool,
) -> None:
    r"""Fold one estimate per tensor into `hessians` with the fused kernel, in place."""
    lists = _shards(dict(hessians=hessians, estimates=estimates))
    check_fused_tensors(lists)
    _check_parallel(lists, "hessians", same_dtype=False)
    if not hessians:
        return
    # The build before the conversions, so that a machine without a compiler fails
    # before anything is allocated.
    extensions = _extensions(lists["hessians"])

    # Complex tensors as real views, then each estimate in its Hessian's dtype (a new
    # tensor: the caller's estimate is not changed).
    real_hessians = [_as_real(h) for h in lists["hessians"]]
    real_estimates = [
        e if e.dtype == h.dtype else e.to(h.dtype)
        for h, e in zip(real_hessians, map(_as_real, lists["estimates"]))
    ]

    # Reference: the loop over tensors, one call per `(device, dtype)` group, each the
    # fold $h = \beta_2 h + (1-\beta_2)\hat h$ of Algorithm 3, lines 7-10; `square`
    # selects $\hat g \odot \hat g$ or $\hat h$ as the estimate.
    for group in group_by_device_and_dtype(real_hessians, real_estimates).values():
        device = group[0][0].device
        stream, on_device = _stream_and_device(device)
        with on_device:
            extensions[device.type].hessian_ema(group, beta2, square, stream)
    _mark_written(lists["hessians"])
