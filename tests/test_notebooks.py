r"""The notebooks: their structure, the outputs stored with them, and a full run of each.

Every claim a notebook makes is an `assert` in one of its cells, so running it is a test:
`test_notebook_runs` executes each one top to bottom in a fresh `python3` kernel from this
environment, on a temporary copy (the committed files are never rewritten), and fails on
the first error. While it runs, every figure the notebook displays is checked for a
title, axis labels and a legend, and the kernel is checked to have an IPython that labml
0.5.3 can display through.

The other tests read the committed files only: the first cell (title, paragraph, "Open in
Colab" badge with the notebook's own path), the setup cell (which installs the package
on Colab only when it is missing, and does nothing here), at least one assertion, and the
stored outputs the docs site shows (one clean top-to-bottom run, small, with figures).

To refresh the stored outputs after editing a notebook:

    jupyter nbconvert --to notebook --execute --inplace notebooks/NAME.ipynb
"""

import ast
import base64
import copy
import importlib
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = [
    "01_toy_quadratics",
    "02_hessian_estimators",
    "03_small_transformer",
    "04_cuda_kernel",
]
REPOSITORY = "literate-sophia/sophia"
INSTALL_URL = f"git+https://github.com/{REPOSITORY}"
# The notebooks that use a GPU when there is one; the estimators' lesson runs on the CPU.
GPU_NOTEBOOKS = ["01_toy_quadratics", "03_small_transformer", "04_cuda_kernel"]

# What the docs site can carry per notebook, and the most text one output may hold: a
# progress bar that prints a line per step would exceed it. 800 kB (was 450 kB): the
# figures are stored at 100 dpi and at least 700 px wide, so that they are readable on
# the site, which makes each 30-240 kB; the first lesson has six.
MAX_NOTEBOOK_BYTES = 800_000
MIN_FIGURE_WIDTH_PX = 700
MAX_TEXT_OUTPUT_CHARS = 20_000

# Generous: the first run on a machine compiles the fused kernel's CPU build (under a
# minute), and the machine may be busy.
CELL_TIMEOUT_SECONDS = 900


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


# ## Structure


def test_every_notebook_is_there():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_cell_has_title_paragraph_and_colab_badge(name):
    first = read(name).cells[0]
    assert first.cell_type == "markdown"
    lines = first.source.strip().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 5, (
        "the first line is the title"
    )
    # A paragraph: prose between the title and the badge, not a one-liner.
    prose = " ".join(
        line for line in lines[1:] if line.strip() and "colab-badge" not in line
    )
    assert len(prose) > 200, prose
    badge = (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{name}.ipynb)"
    )
    assert badge in first.source


def package_source(name: str) -> str:
    r"""The value of `PACKAGE_SOURCE`, the setup cell's first statement."""
    first = ast.parse(read(name).cells[1].source).body[0]
    assert isinstance(first, ast.Assign) and first.targets[0].id == "PACKAGE_SOURCE"
    return ast.literal_eval(first.value)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_second_cell_is_the_setup(name):
    setup = read(name).cells[1]
    assert setup.cell_type == "code"
    for needed in ('"google.colab"', "pip", "install", "import sophia", "fork"):
        assert needed in setup.source, needed
    # One place to change where Colab installs from: the repository at a pinned commit
    # or tag, never the moving default branch.
    source = package_source(name)
    url, _, ref = source.partition("@")
    assert url == INSTALL_URL and ref, source
    assert setup.source.count(INSTALL_URL) == 1
    # A notebook that can use a GPU picks it; the estimators' lesson does not ask for one.
    gpu = name in GPU_NOTEBOOKS
    assert ("torch.cuda.is_available()" in setup.source) == gpu
    assert (read(name).metadata.get("accelerator") == "GPU") == gpu


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_claims_are_assertions(name):
    # `assert` statements, or `torch.testing.assert_close` calls, in the code cells, and
    # every `assert` says what was expected: tinkering gives an explanation.
    found = 0
    for cell in code_cells(read(name)):
        for node in ast.walk(ast.parse(cell.source)):
            found += isinstance(node, ast.Assert)
            found += isinstance(node, ast.Attribute) and node.attr == "assert_close"
            if isinstance(node, ast.Assert):
                assert node.msg is not None, ast.unparse(node)
    assert found >= 3, f"{name} has {found} assertions"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ends_with_exercises(name):
    cells = read(name).cells
    (heading,) = [
        i
        for i, c in enumerate(cells)
        if c.cell_type == "markdown" and "## Exercises" in c.source
    ]
    exercises = cells[heading].source
    assert (
        exercises.count("\n1. ") + exercises.count("\n2. ") + exercises.count("\n3. ")
        == 3
    )
    assert "Hint" in exercises
    # The last cell checks an answer, and does nothing until the reader sets one.
    assert cells[-1].cell_type == "code" and "= None" in cells[-1].source
    assert heading >= len(cells) - 3


@pytest.mark.parametrize("name", GPU_NOTEBOOKS)
def test_fused_build_announced_with_fallback(name):
    # The first fused use says it may compile, and a failed build falls back visibly.
    source = "\n".join(c.source for c in code_cells(read(name)))
    assert "fused.load_extension(device.type)" in source
    assert "compiled" in source and "except fused.FusedUnavailableError" in source
    assert "FUSED = dict(foreach=True)" in source


# ## The setup cell, run here
#
# It is plain Python (no `!pip`), so it can be run in this process. Here, where the package
# is installed, it must not call pip; on Colab, where `import sophia` fails, it must
# install the package from the repository and import it. `subprocess.run` is replaced by a
# recorder in both cases, and the figure settings the cell makes are undone afterwards.


def run_setup_cell(name, monkeypatch, *, colab: bool, installed: bool):
    import subprocess

    import matplotlib

    calls = []
    package = importlib.import_module("sophia")

    def fake_run(args, **kwargs):
        calls.append(args)
        # The "installation" makes the package importable again.
        monkeypatch.setitem(sys.modules, "sophia", package)
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    if not installed:
        # `None` in `sys.modules` makes `import sophia` raise `ImportError`.
        monkeypatch.setitem(sys.modules, "sophia", None)
    namespace = {}
    with matplotlib.rc_context():
        exec(compile(read(name).cells[1].source, f"{name}:setup", "exec"), namespace)
    return calls, namespace


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_cell_does_nothing_when_installed(name, monkeypatch, capsys):
    calls, namespace = run_setup_cell(name, monkeypatch, colab=False, installed=True)
    assert calls == []
    assert str(namespace["device"]) in ("cpu", "cuda")
    assert "device:" in capsys.readouterr().out


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_cell_installs_from_the_repository_on_colab(name, monkeypatch):
    calls, namespace = run_setup_cell(name, monkeypatch, colab=True, installed=False)
    assert len(calls) == 1
    command = calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    # Colab runs its own Jupyter: the extras are what the notebooks import (labml,
    # matplotlib, ninja for the kernel's build), not the `notebooks` extra, whose `jupyter`
    # would reinstall the notebook server under the running kernel.
    (requirement,) = [arg for arg in command if arg.startswith("literate-sophia[")]
    assert requirement == f"literate-sophia[train,fused] @ {package_source(name)}"
    assert namespace["sophia"].__name__ == "sophia"


def test_setup_cell_refuses_to_install_outside_colab(monkeypatch):
    # Off Colab, a missing package is the user's to install: the error says so, nothing is run.
    with pytest.raises(ImportError):
        run_setup_cell(NOTEBOOKS[0], monkeypatch, colab=False, installed=False)


# ## The stored outputs
#
# The docs site shows the notebooks as stored, without running them, so they are stored
# with their outputs: one run from top to bottom (execution counts 1, 2, 3, ...), without
# errors, with at least one figure as PNG, small enough for a web page.


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_outputs_are_one_clean_run(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.stat().st_size} bytes"
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    cells = code_cells(nb)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    images = 0
    for cell in cells:
        for output in cell.outputs:
            assert output.output_type != "error", output
            images += "image/png" in output.get("data", {})
            text = output.get("text", "") + "".join(
                str(v)
                for k, v in output.get("data", {}).items()
                if k.startswith("text/")
            )
            assert len(text) < MAX_TEXT_OUTPUT_CHARS, (
                f"an output of {len(text)} characters"
            )
            # The outputs are published (on GitHub, in the site): no path of the machine
            # that ran them.
            assert str(NOTEBOOK_DIR.parent) not in text, (
                f"an output shows the checkout's path: {text[:200]}"
            )
            # Nor a warning, which names the file that raised it: a run that warned
            # (another build of the kernel at the same time, say) is not a clean run,
            # whichever folder it ran in.
            assert "Warning:" not in text, f"an output holds a warning: {text[:300]}"
            # No labml header with the checkout's commit message and state.
            assert "[clean]" not in text and "[dirty]" not in text, text[:300]
            if "image/png" in output.get("data", {}):
                png = base64.b64decode(output.data["image/png"])
                width = int.from_bytes(png[16:20], "big")
                assert width >= MIN_FIGURE_WIDTH_PX, f"a figure {width} px wide"
    assert images >= 1


# ## Running them
#
# A cell injected before the notebook's first cell wraps matplotlib's `print_figure`, which
# the inline backend calls to render each figure it displays, to check the figure first:
# every axes that holds data has a title (its own or the figure's), an x and a y label
# (or shares that axis with one that has it), and a legend when it draws more than one
# labelled artist. A cell injected after the last one fails on any problem found, and
# checks the kernel's IPython: labml 0.5.3 imports `display` from `IPython.core.display`,
# which IPython 9 removed (the package pins `ipython<9` in its extras).

FIGURE_CHECK = r"""
import matplotlib.backend_bases as _backend_bases

_figure_problems, _figures_checked = [], []
_original_print_figure = _backend_bases.FigureCanvasBase.print_figure


def _check_figure(fig):
    suptitle = fig.get_suptitle()
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>" or not ax.has_data():
            continue
        where = f"figure {len(_figures_checked)}, axes {fig.axes.index(ax)}"
        if not (suptitle or any(ax.get_title(loc=loc) for loc in ("center", "left", "right"))):
            _figure_problems.append(f"{where}: no title")
        for axis, shared in (("x", ax.get_shared_x_axes()), ("y", ax.get_shared_y_axes())):
            label = getattr(ax, f"get_{axis}label")
            if not label() and not any(getattr(o, f"get_{axis}label")() for o in shared.get_siblings(ax)):
                _figure_problems.append(f"{where}: no {axis} label")
        artists = [*ax.lines, *ax.collections, *ax.patches, *ax.images]
        labelled = [a for a in artists if a.get_label() and not str(a.get_label()).startswith("_")]
        if len(labelled) > 1 and ax.get_legend() is None:
            _figure_problems.append(f"{where}: {len(labelled)} labelled artists and no legend")


def _checked_print_figure(self, *args, **kwargs):
    _check_figure(self.figure)
    _figures_checked.append(self.figure)
    return _original_print_figure(self, *args, **kwargs)


_backend_bases.FigureCanvasBase.print_figure = _checked_print_figure
"""

FINAL_CHECK = r"""
assert not _figure_problems, _figure_problems
assert _figures_checked, "no figure was displayed"
import IPython

assert IPython.version_info[0] < 9, IPython.__version__
from IPython.core.display import display  # what labml 0.5.3 imports
print(f"{len(_figures_checked)} figures checked; IPython {IPython.__version__}")
"""


def image_counts(nb: nbformat.NotebookNode) -> list[int]:
    return [
        sum("image/png" in o.get("data", {}) for o in cell.outputs)
        for cell in code_cells(nb)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    from nbconvert.preprocessors import ExecutePreprocessor

    committed = read(name)
    nb = copy.deepcopy(committed)
    nb.cells.insert(0, nbformat.v4.new_code_cell(FIGURE_CHECK))
    nb.cells.append(nbformat.v4.new_code_cell(FINAL_CHECK))
    # The kernel inherits this environment; a backend chosen for this process (`Agg`)
    # would stop the kernel from displaying its figures inline.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    before = sorted(NOTEBOOK_DIR.iterdir())
    start = time.perf_counter()
    executor = ExecutePreprocessor(timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3")
    try:
        executor.preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    finally:
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
    # Nothing was written next to the notebooks (labml writes only into a temporary folder).
    assert sorted(NOTEBOOK_DIR.iterdir()) == before
    # The stored outputs come from this source: each cell displays as many figures now as
    # it does in the committed file.
    executed = copy.deepcopy(nb)
    executed.cells = executed.cells[1:-1]
    assert image_counts(executed) == image_counts(committed)
    # labml displayed its runs in the notebook: each run's header and its tracked values.
    if name == "03_small_transformer":
        html = "".join(
            output.data["text/html"]
            for cell in code_cells(executed)
            for output in cell.outputs
            if "text/html" in output.get("data", {})
        )
        for run in ("adamw-seed0", "sophiag-seed0", "sophiah-seed0"):
            assert run in html
        assert "val_loss" in html and "win_rate" in html
        # ...and found the lab in its own folder: no warning about a missing `.labml.yaml`
        # in the notebook's working directory, and no path of that directory shown.
        assert "config file could not be found" not in html
        assert str(tmp_path) not in html
