r"""
---
title: Building the fused kernel
summary: Checks the toolchain, then compiles the kernel's CPU or CUDA build once.
---

The [fused step](fused.html) calls a compiled extension; this module makes it.
`load_extension("cpu")` or `load_extension("cuda")` checks that the tools a build needs
are here, compiles the sources in `csrc/` with `torch.utils.cpp_extension` (under a
minute, then cached on disk), and loads the result, once per process.
`fused_available` asks the same question without raising. The two builds, the
toolchain checks and the caching are explained on
[how the fused kernel is built](../engineering/kernel.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch


# A `RuntimeError`, as PyTorch raises for a build or device that cannot do what is
# asked; a class of its own lets callers tell "cannot be built here" from a bug.
class FusedUnavailableError(RuntimeError):
    r"""The fused kernel cannot be built or loaded here; the message says why."""


# Each build is attempted once per process (keyed by device type and whether it is the
# tests' build), and the lock keeps two threads from building at the same time.
_CSRC = Path(__file__).resolve().parent / "csrc"
_BUILD_LOCK = threading.Lock()
_BUILDS: dict[tuple[str, bool], ModuleType | FusedUnavailableError] = {}


# ## What a build needs
#
# Each missing piece is one line of the error, so one error lists all of them.
def _missing(device_type: str) -> list[str]:
    # Imported here: `cpp_extension` pulls in `setuptools`, which `import sophia` should
    # not pay for.
    from torch.utils import cpp_extension

    missing = []
    if not cpp_extension.is_ninja_available():
        missing.append("the ninja build tool (`pip install ninja`)")
    compiler = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler) is None:
        missing.append(
            f"a C++ compiler (looked for `{compiler}`; set CXX to choose one): "
            "g++ (`apt install g++`), Xcode's command-line tools, or the MSVC build "
            "tools"
        )
    include = sysconfig.get_paths().get("include")
    if include is None or not Path(include, "Python.h").exists():
        missing.append(
            "Python's C headers (`apt install python3-dev`, or a Python that ships "
            "them)"
        )
    if device_type == "cuda":
        missing += _missing_cuda(cpp_extension.CUDA_HOME)
    return missing


# The CUDA build needs a CUDA build of PyTorch and a toolkit whose `nvcc` has the same
# major version, which `cpp_extension.load` does not check itself.
def _missing_cuda(cuda_home: str | None) -> list[str]:
    cuda = torch.version.cuda
    if cuda is None:
        return [
            f"a CUDA build of PyTorch: this torch ({torch.__version__}) is CPU-only; "
            "install one from https://pytorch.org/get-started/locally/ (the CPU build, "
            "load_extension('cpu'), works with this one)"
        ]
    if cuda_home is None:
        return [
            f"a CUDA toolkit with nvcc (CUDA {cuda}, to match this torch); "
            "install it and set CUDA_HOME to its directory"
        ]
    nvcc = _nvcc_version(cuda_home)
    if nvcc is None:
        return [f"a working nvcc under CUDA_HOME={cuda_home}"]
    if nvcc.split(".")[0] != cuda.split(".")[0]:
        return [
            f"an nvcc matching torch's CUDA {cuda}: CUDA_HOME={cuda_home} has nvcc "
            f"{nvcc}; point CUDA_HOME at a CUDA {cuda.split('.')[0]}.x toolkit"
        ]
    return _missing_cuda_runtime(cuda_home)


# The link needs `libcudart` and the binding `cuda_runtime.h` under `CUDA_HOME`: a
# `CUDA_HOME` that only holds a `bin/nvcc` (a link to the toolkit's) passes the nvcc
# check and then fails at the link, so both are looked for where the build will look.
def _missing_cuda_runtime(cuda_home: str) -> list[str]:
    home = Path(cuda_home)
    missing = []
    if sys.platform == "win32":
        libraries = list(home.glob("lib/x64/cudart*.lib"))
    else:
        libraries = [*home.glob("lib64/libcudart.so*"), *home.glob("lib/libcudart.so*")]
    if not libraries:
        where = "lib\\x64\\cudart.lib" if sys.platform == "win32" else "lib64/ or lib/"
        missing.append(
            f"the CUDA runtime library (libcudart) under CUDA_HOME={cuda_home} "
            f"(looked in {where}); set CUDA_HOME to the toolkit's own directory, the "
            "one whose lib64/ holds libcudart"
        )
    if not (home / "include" / "cuda_runtime.h").exists():
        missing.append(
            f"the CUDA runtime headers under CUDA_HOME={cuda_home} (looked for "
            f"{home / 'include' / 'cuda_runtime.h'})"
        )
    return missing


# `X.Y` from `nvcc --version`'s "release X.Y"; any failure means "no working nvcc".
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


# ## The two builds
#
# The CPU build's name and flags: no contraction of a multiply and an add, OpenMP where
# the compiler has it, and `-mfma` (with its own name, so a shared cache never hands it
# to a CPU without the instruction) where PyTorch reports AVX2 or AVX-512.
def _cpu_flags() -> tuple[str, list[str], list[str]]:
    if sys.platform == "win32":
        return "sophia_fused_cpu", ["/O2", "/fp:precise", "/openmp"], []
    cflags, ldflags = ["-O3", "-ffp-contract=off"], []
    if sys.platform != "darwin":
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    name = "sophia_fused_cpu"
    if platform.machine().lower() in (
        "x86_64",
        "amd64",
    ) and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        cflags.append("-mfma")
        name += "_fma"
    return name, cflags, ldflags


# The arguments of `cpp_extension.load` for one build. Both builds share the binding;
# the CPU build compiles the launcher as C++ through the emulation header, the CUDA
# build with `nvcc`. The tests' build adds `SOPHIA_TESTING` and has a name of its own.
def _build_arguments(device_type: str, testing: bool) -> dict:
    msvc = sys.platform == "win32"
    define = "/D" if msvc else "-D"
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
            extra_cflags=["/O2" if msvc else "-O3", f"{define}SOPHIA_BUILD_CUDA"],
            extra_cuda_cflags=["-O3"],
        )
    if testing:
        name += "_testing"
        kwargs["extra_cflags"] += [f"{define}SOPHIA_TESTING"]
        kwargs["extra_cuda_cflags"] = kwargs.get("extra_cuda_cflags", []) + [
            "-DSOPHIA_TESTING"
        ]
    return dict(name=name, **kwargs)


# ## A build killed halfway
#
# `cpp_extension.load` guards a build directory with a file named `lock`, which it
# creates and deletes; a process killed while it builds leaves the file behind, and
# every later load waits for it forever, with no output. So our builds first take an
# operating-system lock (`fcntl.flock`) on `sophia.lock` in the same directory, which
# the kernel releases when its holder dies, even by `SIGKILL`. Whoever holds it is the
# only build of ours there: a `lock` file it finds has no live owner and is removed,
# with a warning; waiting for a live build says so. Without `flock` (Windows), a `lock`
# older than `STALE_AFTER` seconds is stale: a build of this kernel takes a minute on
# the CPU and a few with `nvcc`, so half an hour is far beyond any live one.
STALE_AFTER = 30 * 60


@contextlib.contextmanager
def _exclusive_build(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:
        _remove_stale(directory / "lock", time.time() - STALE_AFTER)
        yield
        return
    with open(directory / "sophia.lock", "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(
                f"waiting for another process that builds the fused kernel in "
                f"{directory} (it holds {directory / 'sophia.lock'})",
                stacklevel=4,
            )
            fcntl.flock(held, fcntl.LOCK_EX)
        try:
            _remove_stale(directory / "lock", math.inf)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


# Removes `lock` if it was last changed before `before` (a time in seconds); a younger
# one is announced, since `cpp_extension.load` is about to wait for it.
def _remove_stale(lock: Path, before: float) -> None:
    try:
        changed = lock.stat().st_mtime
    except FileNotFoundError:
        return
    if changed < before:
        lock.unlink(missing_ok=True)
        warnings.warn(
            f"removed the stale build lock {lock}, left by a build of the fused "
            "kernel that was killed",
            stacklevel=4,
        )
    else:
        warnings.warn(
            f"waiting for the build lock {lock}; if no build of the fused kernel is "
            "running, delete that file",
            stacklevel=4,
        )


# The one line a process prints before its first load of a build, on stderr (not a
# warning, which a filter could hide, nor a log record, which needs a handler): a
# first step that stalls for minutes says why. A build found in the cache loads in
# seconds; `ninja` rebuilds only what changed.
BUILD_TIME = {"cpu": "about a minute", "cuda": "a few minutes with nvcc"}


def _announce(device_type: str, directory: Path) -> None:
    print(
        f"sophia: compiling the {device_type} build of the fused kernel "
        f"({BUILD_TIME[device_type]} the first time, seconds once cached in "
        f"{directory})",
        file=sys.stderr,
        flush=True,
    )


# The checks first, so a machine without a compiler gets the list of what to install;
# a compiler's failure keeps the end of its log, where its error summary is.
def _build(device_type: str, testing: bool = False) -> ModuleType:
    missing = _missing(device_type)
    if missing:
        raise FusedUnavailableError(
            f"the {device_type} build of the fused Sophia kernel needs "
            + "; and ".join(missing)
        )
    from torch.utils import cpp_extension

    arguments = _build_arguments(device_type, testing)
    directory = Path(cpp_extension._get_build_directory(arguments["name"], False))
    _announce(device_type, directory)
    try:
        with _exclusive_build(directory):
            return cpp_extension.load(verbose=False, **arguments)
    except Exception as error:
        log = str(error)
        directory = cpp_extension._get_build_directory("", False)
        raise FusedUnavailableError(
            f"building the {device_type} fused Sophia kernel failed "
            f"(sources in {_CSRC}, build directory under {directory}):\n"
            + (log if len(log) < 4000 else "...\n" + log[-4000:])
        ) from error


def load_extension(device_type: str, *, testing: bool = False) -> ModuleType:
    r"""The extension for `"cpu"` or `"cuda"`, built on first use, once per process.

    Raises `FusedUnavailableError` (a `RuntimeError`) saying what is missing. A failure
    is remembered: a second call raises the same error without trying again.
    `testing=True` gives the tests' build, which adds the entry points only tests use.
    """
    # Another device type is a programming error: a `ValueError`, never cached.
    if device_type not in ("cpu", "cuda"):
        raise ValueError(
            "the fused kernel has a 'cpu' and a 'cuda' build, "
            f"got device type {device_type!r}"
        )
    # Only the expected failure is cached; anything else is a bug and propagates.
    key = (device_type, testing)
    with _BUILD_LOCK:
        if key not in _BUILDS:
            try:
                _BUILDS[key] = _build(device_type, testing)
            except FusedUnavailableError as error:
                _BUILDS[key] = error
        built = _BUILDS[key]
    if isinstance(built, FusedUnavailableError):
        raise built
    return built


def fused_available(device_type: str) -> bool:
    r"""True if the fused kernel for `device_type` can be built here. Never raises."""
    # A question must not raise: any exception means "not here".
    try:
        load_extension(device_type)
    except Exception:
        return False
    return True
