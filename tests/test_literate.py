r"""Every module reads as a literate page: front matter, raw docstrings, quiet import."""

import ast
import pathlib
import subprocess
import sys

import pytest
from conftest import non_raw_docstrings

MODULES = sorted(pathlib.Path(__file__).parent.parent.joinpath("sophia").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_opens_with_front_matter(path):
    if path.name == "__main__.py":
        pytest.skip("a two-line entry point, not a page")
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert doc is not None, f"{path.name} has no module docstring"
    lines = doc.strip().splitlines()
    assert lines[0] == "---", f"{path.name}: the docstring must open with front matter"
    end = lines.index("---", 1)
    keys = {line.split(":", 1)[0] for line in lines[1:end]}
    assert {"title", "summary"} <= keys, (
        f"{path.name}: front matter needs title and summary"
    )
    assert len(lines) > end + 1, f"{path.name}: prose must follow the front matter"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_docstring_is_a_raw_string(path):
    lines = non_raw_docstrings(path.read_text())
    assert not lines, f"{path.name}: docstrings at lines {lines} are not raw strings"


def test_import_emits_no_warning():
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::SyntaxWarning",
            "-W",
            "error::DeprecationWarning",
            "-c",
            "import sophia, sophia.reference, sophia.foreach, sophia.optimizer, "
            "sophia.hessian, sophia.fused, sophia.experiments, "
            "sophia.experiments.model, sophia.experiments.data, "
            "sophia.experiments.demo, sophia.experiments.train, "
            "sophia.experiments.benchmark, sophia.experiments.measure",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
