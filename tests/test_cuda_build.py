r"""The CUDA build of the extension compiles, links and imports against a CUDA torch.

The machine that runs the suite usually has no GPU, and its torch is often the CPU
build, which cannot build a CUDA extension at all. A second Python whose torch is the
CUDA build can: `sophia.fused.load_extension("cuda")` there runs the whole build that a
GPU user's first `fused=True` step runs (the binding with `-DSOPHIA_BUILD_CUDA`, the
launcher through nvcc, the link against the CUDA runtime) and imports the result;
only the first launch is left, which needs a device. `.ci/run` makes that Python; here,
`SOPHIA_CUDA_PYTHON` names it:

    python -m venv ~/.cache/sophia/cuda-venv
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= \
        ~/.cache/sophia/cuda-venv/bin/pip install torch==2.13.0 ninja numpy
    export SOPHIA_CUDA_PYTHON=~/.cache/sophia/cuda-venv/bin/python

(the three `PIP_` settings keep a pip configuration that points at a local CPU wheel
from choosing it.) It also needs `nvcc` whose version matches that torch's CUDA, with
`CUDA_HOME` set to the toolkit. Without them the test skips, and fails under `CI=true`.
"""

import os
import pathlib
import shutil
import subprocess
import textwrap

from conftest import require

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETUP = (
    "python -m venv ~/.cache/sophia/cuda-venv && PIP_CONFIG_FILE=/dev/null "
    "PIP_FIND_LINKS= PIP_CONSTRAINT= "
    "~/.cache/sophia/cuda-venv/bin/pip install torch==2.13.0 ninja numpy && "
    "export SOPHIA_CUDA_PYTHON=~/.cache/sophia/cuda-venv/bin/python"
)
# The architectures of the build: Turing (Colab's T4) and Hopper.
ARCHS = "7.5;9.0"

# Run in the CUDA torch's Python, from this checkout: build, import, and report what
# the extension offers and what torch says about CUDA.
PROBE = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from sophia import fused
    ext = fused.load_extension("cuda")
    print("cuda", torch.version.cuda)
    print("available", torch.cuda.is_available())
    print("module", ext.__name__, ext.__file__)
    print("functions", *sorted(n for n in dir(ext) if not n.startswith("_")))
    """
)


def cuda_python() -> str | None:
    path = os.environ.get("SOPHIA_CUDA_PYTHON")
    return os.path.expanduser(path) if path else None


# `CUDA_HOME`, or the first toolkit folder that holds the CUDA runtime: the one above
# the real nvcc's `bin/` (nvcc on PATH may be a link or a wrapper script elsewhere), or
# `/usr/local/cuda`.
def cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = [pathlib.Path("/usr/local/cuda")]
    if nvcc is not None:
        candidates.insert(0, pathlib.Path(os.path.realpath(nvcc)).parent.parent)
    for home in candidates:
        if list(home.glob("lib*/libcudart.so*")):
            return str(home)
    return None


def test_the_cuda_extension_builds_and_imports_against_the_cuda_torch(tmp_path):
    python = cuda_python()
    require(
        python is not None and os.path.exists(python),
        f"SOPHIA_CUDA_PYTHON does not name a Python with the CUDA build of torch: {SETUP}",
    )
    home = cuda_home()
    require(home is not None, "no CUDA toolkit: install one, or set CUDA_HOME")
    env = {
        **os.environ,
        "CUDA_HOME": home,
        "TORCH_CUDA_ARCH_LIST": ARCHS,
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [python, "-c", PROBE, str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["cuda"] != "None", f"{python}'s torch is not a CUDA build"
    assert "sophia_fused_cuda" in lines["module"]
    assert str(tmp_path) in lines["module"], "the extension was not built afresh"
    assert {"fused_step", "hessian_ema", "nonfinite_check"} <= set(
        lines["functions"].split()
    )
