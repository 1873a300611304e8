r"""
---
title: Sophia, the fused kernel
summary: The reference step in one pass over memory, by a CUDA kernel that also runs on the CPU; building it, checking the input, calling it.
---

# Sophia, the fused kernel

The [reference](reference.html) makes one pass over memory per operation, and the
[foreach version](foreach.html) only batches those passes into fewer launches. The
[fused kernel](csrc/sophia_kernel.html) does the whole step in *one* pass: it reads
`param`, `grad`, `exp_avg` and `hessian` once per element, computes in registers, and
writes `param` and `exp_avg` once. The statements inside it are the reference's, in
the same order, with the same names, each marked with the reference line it
implements.

This module is the Python side:

* **building** the extension on first use (`load_extension`), with
  `torch.utils.cpp_extension` (under a minute, then cached on disk). There are two
  builds of the same source: the **CUDA** build, and a **CPU** build that compiles the
  CUDA kernel as C++ and runs it as loops over blocks and threads (legitimate because
  no thread of the kernel ever communicates with another; see the
  [emulation](csrc/cpu_emulation.html)). The CPU build is how the kernel is tested on
  machines without a GPU, and in `float32` it is also a faster CPU step than the
  reference (one pass over memory instead of eight);
* **checking** every tensor before anything is written (`check_fused_tensors`), with
  errors that name the tensor and say what it is;
* **calling** the kernel, one call per `(device, dtype)` group, like the foreach
  version (`sophiag_fused`, `hessian_ema_fused`).

## How close to the reference

The kernel rounds where the reference rounds: every `float16`/`bfloat16` value is
computed in `float32` and rounded once when stored; each reference op is one IEEE
operation (`add_(alpha=)` and `addcmul_` are fused multiply-adds in PyTorch, and in the
kernel); the constants `1 - beta1`, `1 - lr * weight_decay`, `rho * bs` are computed in
`double` from the same Python numbers. On the CPU the CPU build therefore agrees with
the reference **bit for bit** in `float32` and `float64`, and in `bfloat16`/`float16`
as well (the tests assert it, on x86 CPUs where PyTorch's kernels use fused
multiply-adds). On a GPU the reference runs ATen's CUDA kernels, which `nvcc`
compiles into the same fused multiply-adds, so the two should agree bit for bit there
as well; what we promise is what one extra rounding per operation could cost, a
relative $10^{-6}$ per element and step in `float32`.

## What it adds to the reference's contract

* `grad_scale`, `found_inf`: the contract of `torch.amp.GradScaler` with fused
  optimizers. The kernel divides each gradient by the loss scale as it reads it (the
  gradient in memory is not changed), and when `found_inf` is non-zero nothing at all
  changes: not the parameters, not the state, not the step counters. This costs no
  wait for the device, except for one case: step counters on the CPU with a
  `found_inf` on a GPU (the counter cannot be incremented conditionally without
  reading the flag). Keep the counters on the device (`capturable=True`) to avoid it.
* `lr` may be a one-element tensor on the parameters' device, read by the kernel
  from memory: a step captured in a CUDA graph then follows whatever schedule writes
  into it. It is read as `float32`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .foreach import group_by_device_and_dtype
from .reference import _as_real


# ## Building the extension
#
# A build that cannot happen raises `FusedUnavailableError`, a `RuntimeError` whose
# message says what is missing and how to get it.
class FusedUnavailableError(RuntimeError):
    r"""The fused kernel cannot be built or loaded on this machine; the message says why."""


_CSRC = Path(__file__).resolve().parent / "csrc"
_BUILD_LOCK = threading.Lock()
_BUILDS: dict[str, ModuleType | FusedUnavailableError] = {}


# What a build needs, checked before we spend a minute trying: `ninja` (which
# `torch.utils.cpp_extension` drives), a C++ compiler, Python's headers, and for the
# CUDA build a CUDA build of PyTorch and a CUDA toolkit whose `nvcc` has the same major
# version as the CUDA that PyTorch was built with.
def _missing(device_type: str) -> list[str]:
    from torch.utils import cpp_extension

    missing = []
    if not cpp_extension.is_ninja_available():
        missing.append("the ninja build tool (`pip install ninja`)")
    compiler = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler) is None:
        missing.append(
            f"a C++ compiler (looked for `{compiler}`; set CXX to choose one): "
            "g++ (`apt install g++`), Xcode's command-line tools, or the MSVC build tools"
        )
    include = sysconfig.get_paths().get("include")
    if include is None or not Path(include, "Python.h").exists():
        missing.append("Python's C headers (`apt install python3-dev`, or a Python that ships them)")
    if device_type == "cuda":
        if torch.version.cuda is None:
            missing.append(
                f"a CUDA build of PyTorch: this torch ({torch.__version__}) is CPU-only; install one from "
                "https://pytorch.org/get-started/locally/ (the CPU build, load_extension('cpu'), works with this one)"
            )
        elif cpp_extension.CUDA_HOME is None:
            missing.append(
                f"a CUDA toolkit with nvcc (CUDA {torch.version.cuda}, to match this torch); "
                "install it and set CUDA_HOME to its directory"
            )
        else:
            nvcc = _nvcc_version(cpp_extension.CUDA_HOME)
            if nvcc is None:
                missing.append(f"a working nvcc under CUDA_HOME={cpp_extension.CUDA_HOME}")
            elif nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
                missing.append(
                    f"an nvcc matching torch's CUDA {torch.version.cuda}: CUDA_HOME={cpp_extension.CUDA_HOME} "
                    f"has nvcc {nvcc}; point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x toolkit"
                )
    return missing


def _nvcc_version(cuda_home: str) -> str | None:
    nvcc = Path(cuda_home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


# The CPU build's compiler flags, and its name. `-ffp-contract=off` keeps the C++
# compiler from fusing a multiply and an add that the kernel writes as two roundings
# (see the emulation header); OpenMP runs the blocks of a launch in parallel, where the
# compiler has it by default (GCC on Linux). MSVC does not contract under `/fp:precise`.
#
# The kernel's fused multiply-adds are `std::fma` on the CPU. Without the instruction
# enabled that is a library call per element, which also stops the compiler from
# vectorizing the step: an order of magnitude slower. So on x86 CPUs that have it (all
# those PyTorch runs its AVX2 or AVX-512 kernels on) we pass `-mfma`, and name the
# build differently, so that a cache shared between machines never hands this build
# to a CPU without the instruction. (ARM CPUs always have it.)
def _cpu_flags() -> tuple[str, list[str], list[str]]:
    if sys.platform == "win32":
        return "sophia_fused_cpu", ["/O2", "/fp:precise", "/openmp"], []
    cflags, ldflags = ["-O3", "-ffp-contract=off"], []
    if sys.platform != "darwin":
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    name = "sophia_fused_cpu"
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        cflags.append("-mfma")
        name += "_fma"
    return name, cflags, ldflags


def _build(device_type: str) -> ModuleType:
    missing = _missing(device_type)
    if missing:
        raise FusedUnavailableError(
            f"the {device_type} build of the fused Sophia kernel needs " + "; and ".join(missing)
        )
    from torch.utils import cpp_extension

    if device_type == "cpu":
        name, cflags, ldflags = _cpu_flags()
        kwargs = dict(
            sources=[str(_CSRC / "binding.cpp"), str(_CSRC / "launcher_cpu.cpp")],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
        )
    else:
        name = "sophia_fused_cuda"
        kwargs = dict(
            sources=[str(_CSRC / "binding.cpp"), str(_CSRC / "sophia_launcher.cu")],
            extra_cflags=["-O3", "-DSOPHIA_BUILD_CUDA"] if sys.platform != "win32" else ["/O2", "/DSOPHIA_BUILD_CUDA"],
            extra_cuda_cflags=["-O3"],
        )
    try:
        return cpp_extension.load(name=name, verbose=False, **kwargs)
    except Exception as error:
        log = str(error)
        raise FusedUnavailableError(
            f"building the {device_type} fused Sophia kernel failed "
            f"(sources in {_CSRC}, build directory under {cpp_extension._get_build_directory('', False)}):\n"
            + (log if len(log) < 4000 else "...\n" + log[-4000:])
        ) from error


def load_extension(device_type: str) -> ModuleType:
    r"""The built extension for `"cpu"` or `"cuda"`, building it on first use (once per process).

    Raises `FusedUnavailableError` (a `RuntimeError`) saying what is missing. A failure
    is remembered: a second call raises the same error without trying again.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"the fused kernel has a 'cpu' and a 'cuda' build, got device type {device_type!r}")
    with _BUILD_LOCK:
        if device_type not in _BUILDS:
            try:
                _BUILDS[device_type] = _build(device_type)
            except FusedUnavailableError as error:
                _BUILDS[device_type] = error
        built = _BUILDS[device_type]
    if isinstance(built, FusedUnavailableError):
        raise built
    return built


def fused_available(device_type: str) -> bool:
    r"""True if the fused kernel for `device_type` is built or can be built here. Never raises."""
    try:
        load_extension(device_type)
    except Exception:
        return False
    return True


# ## Checking the input
#
# The kernel takes dense, contiguous tensors of a floating storage type it knows, on
# the CPU or a CUDA device; a complex tensor is taken as its real view (see the
# reference). Everything is checked in Python, before the first write, with a message
# that names the tensor and says what it is; the binding checks again, in C++, as a
# last line of defence.
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _describe(t: Tensor) -> str:
    text = f"dtype {t.dtype}, device {t.device}, layout {t.layout}, shape {tuple(t.shape)}"
    if t.layout == torch.strided:
        text += f", strides {t.stride()}"
    return text


def _check_tensor(name: str, i: int, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}[{i}] has layout {t.layout} ({_describe(t)}); the fused kernel takes dense tensors")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{name}[{i}] is on device {t.device} ({_describe(t)}); the fused kernel runs on cuda, "
            "and on cpu through its CPU build"
        )
    if t.dtype not in STORAGE_DTYPES + COMPLEX_DTYPES:
        raise TypeError(
            f"{name}[{i}] has dtype {t.dtype} ({_describe(t)}); the fused kernel takes torch.float32, "
            "torch.float16, torch.bfloat16, torch.float64, and torch.complex64/128 as pairs of reals"
        )
    if t.is_conj() or t.is_neg():
        raise ValueError(
            f"{name}[{i}] is a lazy conjugated or negated view ({_describe(t)}); "
            "call .resolve_conj() / .resolve_neg() first"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"{name}[{i}] is not contiguous ({_describe(t)}); the fused kernel needs contiguous tensors "
            "(foreach=True takes any strides)"
        )


def check_fused_tensors(tensors_by_name: dict[str, list[Tensor]]) -> None:
    r"""Raise `TypeError`, `ValueError` or `RuntimeError` if a tensor is one the fused kernel cannot take.

    `tensors_by_name` maps a name for the error messages ("params", "grads", ...) to a
    list of tensors. Each tensor is checked on its own: dtype, layout, device,
    contiguity.
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


# The lists of one call are parallel: at each index, tensors of the same device and
# shape and, for the step, the same dtype (the kernel has one storage type per launch;
# the optimizer makes its state with its parameter's dtype). `first` names the list
# the others are compared with.
def _check_parallel(lists: dict[str, list], first: str, *, same_dtype: bool) -> None:
    n = len(lists[first])
    for name, tensors in lists.items():
        if len(tensors) != n:
            raise ValueError(f"{name} has {len(tensors)} tensors but {first} has {n}")
    for i, ref in enumerate(lists[first]):
        for name, tensors in lists.items():
            t = tensors[i]
            if t.device != ref.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {first}[{i}] is on {ref.device}")
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but {first}[{i}] has {tuple(ref.shape)}")
            if same_dtype and t.dtype != ref.dtype:
                raise TypeError(
                    f"{name}[{i}] has dtype {t.dtype} but {first}[{i}] has {ref.dtype}; the fused kernel "
                    "needs a parameter and its state in one dtype"
                )
            if t.is_complex() != ref.is_complex():
                raise TypeError(f"{name}[{i}] has dtype {t.dtype} but {first}[{i}] has {ref.dtype} (complex and real)")


def _check_one_value(name: str, value: Any) -> None:
    if isinstance(value, Tensor) and (value.numel() != 1 or not value.is_floating_point()):
        raise ValueError(f"{name} as a tensor must hold one floating-point value, got {_describe(value)}")


# The extensions for the devices of `tensors`, built (or found unavailable) before
# anything is written.
def _extensions(tensors: list[Tensor]) -> dict[str, ModuleType]:
    return {device_type: load_extension(device_type) for device_type in sorted({t.device.type for t in tensors})}


# ## Scalars on the right device
#
# `grad_scale`, `found_inf` and a tensor `lr` go to the kernel as one `float32` in the
# memory of the group's device. A copy between GPUs does not wait for the host; a
# copy to the CPU does (and must: the CPU reads it right away).
def _on_device(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32, non_blocking=device.type == "cuda")


def _lr_for(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    if not isinstance(lr, Tensor):
        return float(lr), None
    if lr.device.type == "cpu" and device.type != "cpu":
        return float(lr.item()), None
    return 0.0, _on_device(lr, device)


def _stream_and_device(device: torch.device) -> tuple[int, contextlib.AbstractContextManager]:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream, torch.cuda.device(device)
    return 0, contextlib.nullcontext()


# ## Counting steps
#
# Reference: `step += 1`, for every tensor. With `found_inf`, the count moves only if
# the flag is zero: we add `(found_inf == 0)`, computed on the flag's device, so no
# one waits for the device unless the counters live on the CPU and the flag on a GPU.
# (Subtracting `found_inf`, as some fused optimizers do, would be wrong when the flag is
# a sum over devices and exceeds one.)
def _count_steps(state_steps: list[Tensor], found_inf: Tensor | None) -> None:
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


# The kernel writes memory behind autograd's back; tell autograd, as any in-place op
# does, so that a tensor saved for backward and then changed here is caught.
def _mark_written(tensors: list[Tensor]) -> None:
    increment_version = getattr(torch.autograd.graph, "increment_version", None)
    if increment_version is not None:
        for t in tensors:
            increment_version(t)


# ## The step
#
# Same arguments and contract as `sophiag_reference`, plus `grad_scale` and
# `found_inf`; `lr` may be a tensor. Order: every check, then the builds, then the
# copies of the scalars (no write to the caller's tensors so far), then the step
# counters and the kernels.
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
    r"""Take one Sophia step on every tensor of `params` with the fused kernel, in place."""
    lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, hessians=hessians)
    check_fused_tensors(lists)
    _check_parallel(lists, "params", same_dtype=True)
    if len(state_steps) != len(params) or not all(isinstance(s, Tensor) for s in state_steps):
        raise TypeError(f"state_steps must be {len(params)} tensors, one per parameter")
    _check_one_value("lr", lr)
    _check_one_value("grad_scale", grad_scale)
    _check_one_value("found_inf", found_inf)
    if not params:
        return
    # `GradScaler` sums its per-device flags; with no flag at all that sum is the number 0.
    if found_inf is not None and not isinstance(found_inf, Tensor):
        if found_inf:
            return
        found_inf = None
    extensions = _extensions(params)

    # Reference: the loop over tensors, here one kernel call per `(device, dtype)`
    # group, complex tensors viewed as real (as in the foreach version).
    groups = group_by_device_and_dtype(*[[_as_real(t) for t in tensors] for tensors in lists.values()])
    calls = []
    for group_params, group_grads, group_exp_avgs, group_hessians in groups.values():
        device = group_params[0].device
        lr_value, lr_tensor = _lr_for(lr, device)
        calls.append(
            (
                device,
                (group_params, group_grads, group_exp_avgs, group_hessians, lr_value, lr_tensor),
                None if grad_scale is None else _on_device(grad_scale, device),
                None if found_inf is None else _on_device(found_inf, device),
            )
        )

    # Reference: `step += 1`.
    _count_steps(state_steps, found_inf)

    # Reference: the step's statements, for every element of the group, in one kernel.
    # `rho * bs` is the reference's Python product; the kernel derives the other
    # constants from these numbers as the reference does.
    for device, (ps, gs, ms, hs, lr_value, lr_tensor), scale, inf in calls:
        stream, on_device = _stream_and_device(device)
        with on_device:
            extensions[device.type].fused_step(
                ps, gs, ms, hs, lr_value, lr_tensor, beta1, rho * bs, weight_decay, eps, maximize, scale, inf, stream
            )
    _mark_written(params + exp_avgs)


# ## The Hessian EMA
#
# Same contract as `hessian_ema_reference`. The kernel has one storage type per call,
# so an estimate whose dtype differs from its Hessian's is first converted to the
# Hessian's dtype. Converting up (a `bfloat16` estimate into a `float32` Hessian) is
# exact, and the result is the reference's. Converting down (a `float32` estimate into
# a `bfloat16` Hessian) rounds the estimate once, to nearest even, before it is squared
# and folded in, a relative change of at most $2^{-9}$ per estimate; the reference
# squares the `float32` estimate, so the two can then differ in the last bit of the
# stored Hessian.
def hessian_ema_fused(
    hessians: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: float,
    square: bool,
) -> None:
    r"""Fold one estimate per tensor into `hessians` with the fused kernel, in place."""
    lists = dict(hessians=hessians, estimates=estimates)
    check_fused_tensors(lists)
    _check_parallel(lists, "hessians", same_dtype=False)
    if not hessians:
        return
    extensions = _extensions(hessians)

    real_hessians = [_as_real(h) for h in hessians]
    real_estimates = [_as_real(e) for e in estimates]
    real_estimates = [e if e.dtype == h.dtype else e.to(h.dtype) for h, e in zip(real_hessians, real_estimates)]

    for group_hessians, group_estimates in group_by_device_and_dtype(real_hessians, real_estimates).values():
        stream, on_device = _stream_and_device(group_hessians[0].device)
        with on_device:
            extensions[group_hessians[0].device.type].hessian_ema(
                group_hessians, group_estimates, beta2, square, stream
            )
    _mark_written(hessians)
