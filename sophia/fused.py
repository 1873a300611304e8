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
* Sharded tensors: under FSDP (`fully_shard`) the parameters and the state are
  `DTensor`s, and the kernel steps each process's shards, which the elementwise step
  allows (see "Sharded tensors" below).
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

# The kernel is grouped by the foreach version's own function, so the two make the same
# groups, and complex tensors become real views with the reference's `_as_real`: one
# definition of each, shared by the three implementations.
from .foreach import group_by_device_and_dtype
from .reference import _as_real


# ## Building the extension
#
# A build that cannot happen raises `FusedUnavailableError`, a `RuntimeError` whose
# message says what is missing and how to get it.
#
# It subclasses `RuntimeError` because that is what PyTorch raises for a device or build
# that cannot do what is asked, so code that already catches PyTorch's failures catches
# this one too. Having a class of its own lets `fused=None`, the demo and the benchmark
# tell "cannot be built here" (fall back, or report) from a genuine bug (let it raise).
class FusedUnavailableError(RuntimeError):
    r"""The fused kernel cannot be built or loaded on this machine; the message says why."""


# The sources live next to this file, in `csrc/`, and are installed with the package.
# `_BUILDS` holds, per device type, the loaded module or the error that stopped it, so
# each build is attempted at most once per process: a build that failed once would
# almost surely fail again, and trying again at every step could cost a minute per step. `_BUILD_LOCK`
# makes "check the cache, else build" one operation, so two threads that step at the same
# time do not both start a build. (Between processes, `torch.utils.cpp_extension` keeps a
# lock file in the build directory.)
_CSRC = Path(__file__).resolve().parent / "csrc"
_BUILD_LOCK = threading.Lock()
_BUILDS: dict[str, ModuleType | FusedUnavailableError] = {}


# What a build needs, checked before we spend a minute trying: `ninja` (which
# `torch.utils.cpp_extension` drives), a C++ compiler, Python's headers, and for the
# CUDA build a CUDA build of PyTorch and a CUDA toolkit whose `nvcc` has the same major
# version as the CUDA that PyTorch was built with.
def _missing(device_type: str) -> list[str]:
    # `torch.utils.cpp_extension` is imported where it is needed, not at the top: it pulls
    # in `setuptools`, which every import of this package would otherwise pay for.
    from torch.utils import cpp_extension

    # Each missing piece is a line of the message, so one error lists all of them. `ninja`
    # first: `cpp_extension.load` refuses to run without it.
    missing = []
    if not cpp_extension.is_ninja_available():
        missing.append("the ninja build tool (`pip install ninja`)")
    # The compiler `cpp_extension` will call: `$CXX` if set, else the platform's default.
    compiler = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler) is None:
        missing.append(
            f"a C++ compiler (looked for `{compiler}`; set CXX to choose one): "
            "g++ (`apt install g++`), Xcode's command-line tools, or the MSVC build tools"
        )
    # The extension's binding includes `Python.h` (through pybind11); some Linux
    # distributions ship it in a separate package.
    include = sysconfig.get_paths().get("include")
    if include is None or not Path(include, "Python.h").exists():
        missing.append(
            "Python's C headers (`apt install python3-dev`, or a Python that ships them)"
        )
    # The CUDA build needs a PyTorch built for CUDA, a toolkit, and a toolkit of the same
    # major version. `cpp_extension.load` does not compare the versions itself, and a
    # mismatch would surface later as a compiler or loader error far from its cause
    # (PyTorch's setup-time builds refuse a different major version for the same reason).
    # Checking it here gives one message that names both versions and the fix.
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
            # Only the major versions must agree: within a major version CUDA keeps binary
            # compatibility, so a toolkit slightly older or newer than PyTorch's builds a kernel
            # that links with it.
            nvcc = _nvcc_version(cpp_extension.CUDA_HOME)
            if nvcc is None:
                missing.append(
                    f"a working nvcc under CUDA_HOME={cpp_extension.CUDA_HOME}"
                )
            elif nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
                missing.append(
                    f"an nvcc matching torch's CUDA {torch.version.cuda}: CUDA_HOME={cpp_extension.CUDA_HOME} "
                    f"has nvcc {nvcc}; point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x toolkit"
                )
    return missing


# `nvcc --version` ends with a line like "Cuda compilation tools, release X.Y, ...":
# we keep `X.Y`. Any failure (no binary, no permission, a hang cut short by the
# `timeout`, an unexpected output) means "no working nvcc", reported as such above.
def _nvcc_version(cuda_home: str) -> str | None:
    nvcc = Path(cuda_home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")
    try:
        out = subprocess.run(
            [str(nvcc), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
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
    # On Windows, MSVC's flags; `/fp:precise` already forbids the contraction that
    # `-ffp-contract=off` forbids elsewhere.
    if sys.platform == "win32":
        return "sophia_fused_cpu", ["/O2", "/fp:precise", "/openmp"], []
    cflags, ldflags = ["-O3", "-ffp-contract=off"], []
    # Apple's clang has no `-fopenmp` out of the box: on macOS the blocks of a launch run
    # one after another, which is correct and only slower.
    if sys.platform != "darwin":
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    # The test on `get_cpu_capability()` rides on PyTorch's own CPU detection, which
    # reports `AVX2` or `AVX512` only for a CPU that also has fused multiply-add.
    name = "sophia_fused_cpu"
    if platform.machine().lower() in (
        "x86_64",
        "amd64",
    ) and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        cflags.append("-mfma")
        name += "_fma"
    return name, cflags, ldflags


# ### One build
#
# The checks above come first, so that a machine without a compiler gets the list of
# what to install instead of a compiler's error. Then `cpp_extension.load` compiles the
# sources into a Python module, in a directory named after the build
# (`$TORCH_EXTENSIONS_DIR`, by default under `~/.cache/torch_extensions`), and loads it.
# It recompiles only when a source file or a flag has changed: the first call takes under
# a minute, later ones (in this or another process) only load the library.
def _build(device_type: str) -> ModuleType:
    missing = _missing(device_type)
    if missing:
        raise FusedUnavailableError(
            f"the {device_type} build of the fused Sophia kernel needs "
            + "; and ".join(missing)
        )
    from torch.utils import cpp_extension

    # The two builds share the binding. The CPU build compiles the launcher as C++ with the
    # CUDA kernel included through the emulation header; the CUDA build compiles the
    # launcher with `nvcc`, and `SOPHIA_BUILD_CUDA` tells the binding which device it serves.
    if device_type == "cpu":
        name, cflags, ldflags = _cpu_flags()
        kwargs = dict(
            sources=[str(_CSRC / "binding.cpp"), str(_CSRC / "launcher_cpu.cpp")],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
        )
    else:
        # `nvcc` compiles for the GPU architectures in `TORCH_CUDA_ARCH_LIST` or, where that is
        # unset, for the GPUs visible when the build runs: build on the kind of machine that will
        # run the kernel.
        name = "sophia_fused_cuda"
        kwargs = dict(
            sources=[str(_CSRC / "binding.cpp"), str(_CSRC / "sophia_launcher.cu")],
            extra_cflags=["-O3", "-DSOPHIA_BUILD_CUDA"]
            if sys.platform != "win32"
            else ["/O2", "/DSOPHIA_BUILD_CUDA"],
            extra_cuda_cflags=["-O3"],
        )
    # Any failure of the compiler or the loader becomes a `FusedUnavailableError` that
    # says where the sources and the build directory are, followed by the compiler's log.
    # Only the end of a long log is kept: that is where the compiler's error summary is,
    # and an exception message of many screens hides more than it shows.
    try:
        return cpp_extension.load(name=name, verbose=False, **kwargs)
    # `from error` keeps the compiler's exception chained, with its own traceback.
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
    # Another device type is a programming error, not a missing tool: a `ValueError`,
    # raised before the lock, and never cached.
    if device_type not in ("cpu", "cuda"):
        raise ValueError(
            f"the fused kernel has a 'cpu' and a 'cuda' build, got device type {device_type!r}"
        )
    # Build or fetch, under the lock; a failure is cached like a success. The cached error is
    # raised outside the lock, so a thread that raises never holds it.
    with _BUILD_LOCK:
        if device_type not in _BUILDS:
            try:
                _BUILDS[device_type] = _build(device_type)
            # Only the expected failure is cached. Anything else is a bug, not a missing tool: it
            # propagates, uncached, and the next call tries again.
            except FusedUnavailableError as error:
                _BUILDS[device_type] = error
        built = _BUILDS[device_type]
    if isinstance(built, FusedUnavailableError):
        raise built
    return built


def fused_available(device_type: str) -> bool:
    r"""True if the fused kernel for `device_type` is built or can be built here. Never raises."""
    # Any exception at all means "not here": this answers the question `fused=None` asks
    # before quietly choosing foreach, and a question must not raise.
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
#
# `STORAGE_DTYPES` are the four storage types the launcher has a code for; complex
# tensors reach it as their real views, so `COMPLEX_DTYPES` are those whose real view is
# one of them.
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


# What an error message says about a tensor: enough to find it in the model (shape,
# dtype, device) and to see what is wrong with it (layout, strides).
def _describe(t: Tensor) -> str:
    text = (
        f"dtype {t.dtype}, device {t.device}, layout {t.layout}, shape {tuple(t.shape)}"
    )
    if t.layout == torch.strided:
        text += f", strides {t.stride()}"
    return text


def _check_tensor(name: str, i: int, t: Any) -> None:
    # The checks, in the order in which each one makes the next meaningful. Only a dense
    # (strided) tensor has strides and contiguity; the device must be one the kernel has a
    # build for; the dtype one of the storage types.
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(
            f"{name}[{i}] has layout {t.layout} ({_describe(t)}); the fused kernel takes dense tensors"
        )
    # A tensor on another device (`mps`, `xpu`, `meta`) has no build to go to: a
    # `RuntimeError`, as PyTorch raises for a device an op does not support.
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{name}[{i}] is on device {t.device} ({_describe(t)}); the fused kernel runs on cuda, "
            "and on cpu through its CPU build"
        )
    # Integer and Boolean tensors are not something an optimizer steps, and the `float8`
    # types have no storage code in the launcher: all are refused by name.
    if t.dtype not in STORAGE_DTYPES + COMPLEX_DTYPES:
        raise TypeError(
            f"{name}[{i}] has dtype {t.dtype} ({_describe(t)}); the fused kernel takes torch.float32, "
            "torch.float16, torch.bfloat16, torch.float64, and torch.complex64/128 as pairs of reals"
        )
    # A lazy view (`z.conj()` of a complex tensor, or the negation PyTorch keeps as a flag)
    # shares memory with its base and only marks that the values are to be conjugated or
    # negated when read. The kernel reads raw memory and would miss the mark: it would
    # compute with $z$ instead of $\bar z$, or with $x$ instead of $-x$.
    # An inference tensor (made under `torch.inference_mode()`) cannot be written in
    # place outside that mode, and the binding refuses it; refuse it here, before the
    # first write of the step.
    if t.is_inference():
        raise RuntimeError(
            f"{name}[{i}] is an inference tensor ({_describe(t)}); the optimizer cannot update it in place"
        )
    if t.is_conj() or t.is_neg():
        raise ValueError(
            f"{name}[{i}] is a lazy conjugated or negated view ({_describe(t)}); "
            "call .resolve_conj() / .resolve_neg() first"
        )
    # The kernel addresses element $i$ of a tensor at its data pointer plus $i$: that is
    # only the tensor's element $i$ when the tensor is contiguous.
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
    # All lists, all tensors, before anything else happens; the first failure raises.
    for name, tensors in tensors_by_name.items():
        for i, t in enumerate(tensors):
            _check_tensor(name, i, t)


def fused_supports(tensors: list[Tensor]) -> bool:
    r"""True if the fused kernel takes every tensor of `tensors`. Never raises."""
    # The same checks as a yes-or-no answer: `fused=None` uses it to decide, without an
    # error, whether this group's tensors can go to the kernel.
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
    # Lengths first, so that indexing below is safe; then, at each index, every list against
    # `first`. A complex tensor paired with a real one would have a real view of a different
    # shape, so it is refused as a dtype mismatch with both dtypes named.
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
                    f"{name}[{i}] has shape {tuple(t.shape)} but {first}[{i}] has {tuple(ref.shape)}"
                )
            # The step needs the four tensors of an index in one dtype: a launch has one storage
            # type. The EMA does not (`same_dtype=False`): its estimates are converted first.
            if same_dtype and t.dtype != ref.dtype:
                raise TypeError(
                    f"{name}[{i}] has dtype {t.dtype} but {first}[{i}] has {ref.dtype}; the fused kernel "
                    "needs a parameter and its state in one dtype"
                )
            if t.is_complex() != ref.is_complex():
                raise TypeError(
                    f"{name}[{i}] has dtype {t.dtype} but {first}[{i}] has {ref.dtype} (complex and real)"
                )


# A scalar argument (`lr`, `grad_scale`, `found_inf`) is a Python number or a tensor that
# holds one floating-point value: the kernel reads a single `float32` from its address,
# and a tensor of several values has no single value to give it.
def _check_one_value(name: str, value: Any) -> None:
    if isinstance(value, Tensor) and (
        value.numel() != 1 or not value.is_floating_point()
    ):
        raise ValueError(
            f"{name} as a tensor must hold one floating-point value, got {_describe(value)}"
        )


# The extensions for the devices of `tensors`, built (or found unavailable) before
# anything is written.
#
# In sorted order, so that two runs build in the same order and report the same first
# failure.
def _extensions(tensors: list[Tensor]) -> dict[str, ModuleType]:
    return {
        device_type: load_extension(device_type)
        for device_type in sorted({t.device.type for t in tensors})
    }


# ## Sharded tensors (FSDP)
#
# Under PyTorch's FSDP (`fully_shard`), a parameter, its gradient and the optimizer's
# state are `DTensor`s: each process holds one shard of each, an ordinary tensor, and
# all three are sharded the same way. The step is elementwise, so the step of the whole
# tensor is the step of each shard on its own process: the kernel is given the shards
# (`to_local()`, which shares memory with the `DTensor`) and writes into them. This needs
# the tensors of one index to be sharded alike (the same mesh and placements); a
# gradient still waiting for its reduction (`Partial`), or a state sharded otherwise,
# is refused, since the kernel would combine shards that do not hold the same elements.
def _is_dtensor(t: Any) -> bool:
    return (
        isinstance(t, Tensor) and hasattr(t, "device_mesh") and hasattr(t, "to_local")
    )


def _shards(lists: dict[str, list]) -> dict[str, list]:
    names = list(lists)
    # Plain tensors only (no FSDP): the lists go on as they are, and nothing is looked at
    # twice; `check_fused_tensors` does the checks of plain tensors.
    if not any(
        _is_dtensor(t)
        for tensors in lists.values()
        for t in tensors
        if isinstance(t, Tensor)
    ):
        return lists
    # Index by index, every list's tensor against the first list's (the parameter's): both
    # `DTensor`s, on the same mesh, with the same placements. Lists of different lengths
    # are compared as far as the shortest; `_check_parallel` refuses the difference.
    n = min(len(tensors) for tensors in lists.values())
    for i in range(n):
        first = lists[names[0]][i]
        for name in names:
            t = lists[name][i]
            if not (_is_dtensor(first) and _is_dtensor(t)):
                raise TypeError(
                    f"{name}[{i}] and {names[0]}[{i}] must both be DTensors or both plain tensors"
                )
            if t.device_mesh != first.device_mesh or tuple(t.placements) != tuple(
                first.placements
            ):
                raise ValueError(
                    f"{name}[{i}] is sharded as {tuple(t.placements)} but {names[0]}[{i}] as "
                    f"{tuple(first.placements)}; the fused kernel steps matching shards only"
                )
    # The shards, views of the `DTensor`s' memory: what the kernel writes, the `DTensor`s hold.
    return {
        name: [t.to_local() if _is_dtensor(t) else t for t in tensors]
        for name, tensors in lists.items()
    }


# ## Scalars on the right device
#
# `grad_scale`, `found_inf` and a tensor `lr` go to the kernel as one `float32` in the
# memory of the group's device. A copy between GPUs does not wait for the host; a
# copy to the CPU does (and must: the CPU reads it right away).
#
# When the tensor already is a `float32` tensor on `device`, `.to` returns the tensor
# itself, no copy: the kernel then reads the caller's memory at each launch. That is
# what lets a CUDA graph captured around `step()` follow a learning-rate schedule that
# writes into the `lr` tensor between replays. Otherwise (another dtype, another GPU)
# the copy is itself an operation on the stream, captured with the graph, so replays
# read the source again.
def _on_device(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=torch.float32, non_blocking=device.type == "cuda")


# The learning rate goes to the kernel as a number (`lr_value`) or as an address
# (`lr_tensor`, and then `lr_value` is unused). A Python number goes by value. A
# tensor on the CPU, for a GPU group, is read on the host (`.item()` of a CPU tensor
# waits for nothing) and goes by value: under CUDA graph capture, that value is frozen
# into the graph, so keep a captured schedule's `lr` on the device. A tensor anywhere
# else goes by address, on the group's device.
def _lr_for(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    if not isinstance(lr, Tensor):
        return float(lr), None
    if lr.device.type == "cpu" and device.type != "cpu":
        return float(lr.item()), None
    return 0.0, _on_device(lr, device)


# The kernel is launched on PyTorch's current stream for the group's device, under that
# device's guard. So it runs after the work already queued there (the backward pass
# that wrote the gradients), before whatever the caller queues next, and a graph capture
# of that stream captures it.
# On the CPU there is no stream: `0`, and nothing to enter.
def _stream_and_device(
    device: torch.device,
) -> tuple[int, contextlib.AbstractContextManager]:
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
    # Without a scaler: one foreach add over all counters, wherever they live.
    if found_inf is None:
        torch._foreach_add_(state_steps, 1)
        return
    # With a scaler: the increment is the Boolean $[\text{found\_inf} = 0]$, computed where
    # the flag is, then copied (as `0.0` or `1.0`) to each `(device, dtype)` of the
    # counters, since a foreach add needs its operands on one device. The only copy that
    # waits is one from a GPU to the CPU.
    not_skipped = found_inf.reshape(()) == 0
    by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
    for step in state_steps:
        by_kind[(step.device, step.dtype)].append(step)
    # One add per kind of counter: CPU counters (the default) form one kind, device counters
    # (`capturable`, `fused`) one per device.
    for (device, dtype), steps in by_kind.items():
        increment = not_skipped.to(device=device, dtype=dtype)
        torch._foreach_add_(steps, [increment] * len(steps))


# The kernel writes memory behind autograd's back; tell autograd, as any in-place op
# does, so that a tensor saved for backward and then changed here is caught.
def _mark_written(tensors: list[Tensor]) -> None:
    # `torch.autograd.graph.increment_version` is a recent addition; on a PyTorch without it
    # the bump is skipped, and only that safety check is lost, not the step.
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
    # The checks. Every tensor on its own, then the four lists against each other, then the
    # counters and the scalars. A refused call returns here, with nothing written. Sharded
    # tensors (FSDP) are replaced by this process's shards first (see above).
    lists = _shards(
        dict(params=params, grads=grads, exp_avgs=exp_avgs, hessians=hessians)
    )
    params, exp_avgs = lists["params"], lists["exp_avgs"]
    check_fused_tensors(lists)
    _check_parallel(lists, "params", same_dtype=True)
    # The counters never reach the kernel (`_count_steps` counts them with PyTorch ops,
    # wherever they live), so one tensor per parameter is all that is asked of them.
    if len(state_steps) != len(params) or not all(
        isinstance(s, Tensor) for s in state_steps
    ):
        raise TypeError(f"state_steps must be {len(params)} tensors, one per parameter")
    _check_one_value("lr", lr)
    _check_one_value("grad_scale", grad_scale)
    _check_one_value("found_inf", found_inf)
    # Nothing to step (a group whose parameters have no gradients): no build, no launch.
    if not params:
        return
    # `GradScaler` sums its per-device flags; with no flag at all that sum is the number 0.
    #
    # A flag that is a Python number is read on the host: non-zero skips the whole call
    # (nothing counted, nothing written), zero is the same as no flag.
    if found_inf is not None and not isinstance(found_inf, Tensor):
        if found_inf:
            return
        found_inf = None
    # The builds, or the `FusedUnavailableError` that says why there is none. Still nothing
    # written: a machine without a compiler fails here, with the parameters untouched.
    extensions = _extensions(params)

    # Reference: the loop over tensors, here one kernel call per `(device, dtype)`
    # group, complex tensors viewed as real (as in the foreach version).
    groups = group_by_device_and_dtype(
        *[[_as_real(t) for t in tensors] for tensors in lists.values()]
    )
    # For each group, the arguments of its call, including the scalars copied to its device
    # (see `_on_device`). These copies are new tensors: the caller's are only read.
    calls = []
    for group_params, group_grads, group_exp_avgs, group_hessians in groups.values():
        device = group_params[0].device
        # The learning rate as this group's kernel will read it: a number, or an address on
        # this group's device.
        lr_value, lr_tensor = _lr_for(lr, device)
        calls.append(
            (
                device,
                (
                    group_params,
                    group_grads,
                    group_exp_avgs,
                    group_hessians,
                    lr_value,
                    lr_tensor,
                ),
                None if grad_scale is None else _on_device(grad_scale, device),
                None if found_inf is None else _on_device(found_inf, device),
            )
        )

    # Reference: `step += 1`.
    #
    # The first write. The counters are all counted at once, before the kernels, with the
    # increment computed on the device: under a scaler they move only if the step happens.
    _count_steps(state_steps, found_inf)

    # Reference: the step's statements, for every element of the group, in one kernel.
    # `rho * bs` is the reference's Python product; the kernel derives the other
    # constants from these numbers as the reference does.
    #
    # One call per group; within it, the launcher packs many tensors into each launch (see
    # the [launcher](csrc/sophia_launcher.html)). `maximize` is the flag, not a negated
    # gradient: the kernel negates as it reads, and the gradient in memory is left as it is.
    for device, (ps, gs, ms, hs, lr_value, lr_tensor), scale, inf in calls:
        stream, on_device = _stream_and_device(device)
        with on_device:
            extensions[device.type].fused_step(
                ps,
                gs,
                ms,
                hs,
                lr_value,
                lr_tensor,
                beta1,
                rho * bs,
                weight_decay,
                eps,
                maximize,
                scale,
                inf,
                stream,
            )
    # The kernel wrote `param` and `exp_avg`, so those have their version bumped (see
    # `_mark_written`); `grad` and `hessian` were only read.
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
    # The checks: every tensor, then the two lists index by index, but without requiring one
    # dtype (estimates are converted below). Then, if there is anything to do, the build.
    lists = _shards(dict(hessians=hessians, estimates=estimates))
    hessians, estimates = lists["hessians"], lists["estimates"]
    check_fused_tensors(lists)
    _check_parallel(lists, "hessians", same_dtype=False)
    # No estimates to fold (no parameter had one): nothing to build, nothing to launch.
    if not hessians:
        return
    # The build comes before the conversions below, so that a machine without a compiler
    # fails before anything is allocated.
    extensions = _extensions(hessians)

    # Complex tensors as real views, then each estimate in its Hessian's dtype. The
    # conversion makes a new tensor: the caller's estimate is not changed.
    real_hessians = [_as_real(h) for h in hessians]
    real_estimates = [_as_real(e) for e in estimates]
    real_estimates = [
        e if e.dtype == h.dtype else e.to(h.dtype)
        for h, e in zip(real_hessians, real_estimates)
    ]

    # Reference: the loop over tensors, here one call per `(device, dtype)` group, as in the
    # step. `square` selects $\hat g \odot \hat g$ or $\hat h$ as the estimate, as in the
    # reference.
    for group_hessians, group_estimates in group_by_device_and_dtype(
        real_hessians, real_estimates
    ).values():
        stream, on_device = _stream_and_device(group_hessians[0].device)
        with on_device:
            extensions[group_hessians[0].device.type].hessian_ema(
                group_hessians, group_estimates, beta2, square, stream
            )
    # Only the Hessian EMA was written.
    _mark_written(hessians)
