"""The CUDA build's toolchain check, on fake toolkits, and the line a build prints."""

import sys

import pytest
import torch

from sophia import fused_build

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a POSIX nvcc script")


# A toolkit directory whose `bin/nvcc` says it is CUDA 13.0, with the runtime library
# and headers only where asked.
def fake_toolkit(root, *, library=None, header=True):
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.1'\n")
    nvcc.chmod(0o755)
    if library is not None:
        (root / library).mkdir()
        (root / library / "libcudart.so.13").write_bytes(b"")
    if header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def cuda_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_a_whole_toolkit_passes(tmp_path, cuda_torch):
    for library in ("lib64", "lib"):
        home = fake_toolkit(tmp_path / library, library=library)
        assert fused_build._missing_cuda(str(home)) == []


def test_a_cuda_home_with_only_nvcc_names_the_runtime_and_the_path(
    tmp_path, cuda_torch
):
    # The failure the issue saw: CUDA_HOME is the parent of a bin/ that holds nvcc.
    home = fake_toolkit(tmp_path / "only-nvcc", header=False)
    missing = " ".join(fused_build._missing_cuda(str(home)))
    assert "libcudart" in missing and f"CUDA_HOME={home}" in missing
    assert str(home / "include" / "cuda_runtime.h") in missing


def test_a_missing_header_alone_is_named(tmp_path, cuda_torch):
    home = fake_toolkit(tmp_path / "no-header", library="lib64", header=False)
    (missing,) = fused_build._missing_cuda(str(home))
    assert "cuda_runtime.h" in missing and "libcudart" not in missing


def test_load_extension_refuses_with_the_path_before_compiling(
    tmp_path, cuda_torch, monkeypatch, capsys
):
    from torch.utils import cpp_extension

    home = fake_toolkit(tmp_path / "only-nvcc", header=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setattr(fused_build, "_BUILDS", {})
    with pytest.raises(fused_build.FusedUnavailableError, match="libcudart") as error:
        fused_build.load_extension("cuda")
    assert f"CUDA_HOME={home}" in str(error.value)
    # Refused by the checks: nothing was announced, nothing compiled.
    assert "compiling" not in capsys.readouterr().err


def test_the_first_build_in_a_process_prints_one_line(monkeypatch, capsys):
    # A fresh process's cache, with the compile itself replaced by a stand-in.
    from torch.utils import cpp_extension

    monkeypatch.setattr(fused_build, "_BUILDS", {})
    monkeypatch.setattr(fused_build, "_missing", lambda device_type: [])
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: "built")
    assert fused_build.load_extension("cpu") == "built"
    assert fused_build.load_extension("cpu") == "built"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "compiling the cpu build of the fused kernel" in lines[0]
    assert "about a minute" in lines[0] and "cached in" in lines[0]
