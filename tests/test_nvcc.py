r"""The CUDA sources compile with plain nvcc (no PyTorch), and the kernels keep their invariant.

The invariant (each thread touches only its own elements: no shared memory, barriers,
atomics, warp primitives or any other communication between threads) is what makes
the CPU emulation a faithful test of the GPU kernel. It is checked three ways: in the
source text, in the PTX that nvcc generates, and in ptxas's report of barriers used.
These tests need `nvcc`, not a GPU; they skip only where there is no nvcc.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "sophia" / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ["sm_75", "sm_90"]
KERNEL_SOURCES = [CSRC / "sophia_kernel.cuh", CSRC / "sophia_launcher.cu"]
# The build users get, and the tests' build with its extra entry points and kernels.
BUILDS = {"users": [], "tests": ["-DSOPHIA_TESTING"]}


def find_nvcc():
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (install a CUDA toolkit, or set CUDA_HOME)"
)


# One nvcc run in `tmp_path`, compiling `source` into `out`: `-O3` and the given flags.
def nvcc(source, out, *flags):
    return subprocess.run(
        [NVCC, *flags, "-O3", str(source), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=out.parent,
    )


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu file in {CSRC}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_compiles_with_plain_nvcc(source, arch, tmp_path):
    result = nvcc(source, tmp_path / "out.o", "-c", f"-arch={arch}", "-Xptxas", "-v")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0
    barriers = [int(n) for n in re.findall(r"used (\d+) barriers", result.stderr)]
    assert barriers, "ptxas -v reported no kernel"
    assert set(barriers) == {0}, f"a kernel uses barriers: {barriers}"


# `torch.utils.cpp_extension` compiles `.cu` files with these flags (the CUDA build):
# no implicit half conversions or operators, relaxed constexpr.
TORCH_NVCC_FLAGS = [
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Xcompiler",
    "-fPIC",
]


@needs_nvcc
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_compiles_with_the_flags_torch_uses(source, build, tmp_path):
    flags = ["-c", "-arch=sm_80", *TORCH_NVCC_FLAGS, *BUILDS[build]]
    result = nvcc(source, tmp_path / "out.o", *flags)
    assert result.returncode == 0, result.stderr


# PTX instructions through which threads could see each other: barriers, atomics and
# reductions, warp votes and shuffles, fences, and any access to shared memory. The
# tests' build has every kernel of the users' build, and the plain ones.
FORBIDDEN_PTX = re.compile(
    r"^\s*(@!?%\w+\s+)?(bar|barrier|atom|red|redux|shfl|vote|match|membar|fence|activemask|elect|mbarrier)\b"
    r"|\.shared\b",
    re.MULTILINE,
)


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_ptx_has_no_inter_thread_communication(source, tmp_path):
    ptx = tmp_path / "out.ptx"
    result = nvcc(source, ptx, "-ptx", "-arch=compute_90", *BUILDS["tests"])
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    assert ".entry" in text
    found = sorted({m.group(0).strip() for m in FORBIDDEN_PTX.finditer(text)})
    assert not found, f"PTX of {source.name} contains {found}"


def strip_comments(source: str) -> str:
    source = re.sub(r"/\*.*?\*/", " ", source, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", " ", source)


# The source itself, comments removed (the comments state the invariant, and so name
# what it forbids).
FORBIDDEN_SOURCE = [
    "__shared__",
    "__syncthreads",
    "__syncwarp",
    "atomic",
    "__shfl",
    "cooperative_groups",
    "__ballot",
    "__any_sync",
    "__all_sync",
    "__activemask",
    "__threadfence",
    "__match",
    "__reduce_",
    "cuda::barrier",
    "asm",
    "__nanosleep",
]


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernel_source_keeps_the_invariant(source):
    code = strip_comments(source.read_text())
    found = [word for word in FORBIDDEN_SOURCE if word in code]
    assert not found, (
        f"{source.name} uses {found}: threads must not communicate (see the kernel's invariant)"
    )


@pytest.mark.parametrize(
    "source",
    KERNEL_SOURCES + [CSRC / "sophia_launcher.h", CSRC / "cpu_emulation.h"],
    ids=lambda p: p.name,
)
def test_launcher_and_kernel_include_no_torch(source):
    includes = re.findall(r"#\s*include\s*[<\"]([^>\"]+)[>\"]", source.read_text())
    assert not [i for i in includes if i.startswith(("torch", "ATen", "c10"))], includes


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler"
)
@pytest.mark.parametrize("build", list(BUILDS))
def test_cpu_emulation_compiles_without_torch(build, tmp_path):
    result = subprocess.run(
        [
            os.environ.get("CXX", "c++"),
            "-std=c++17",
            "-O1",
            "-ffp-contract=off",
            "-Wall",
            "-Wextra",
            "-Wno-unknown-pragmas",
            "-Werror",
            *BUILDS[build],
            "-c",
            str(CSRC / "launcher_cpu.cpp"),
            "-o",
            str(tmp_path / "cpu.o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
