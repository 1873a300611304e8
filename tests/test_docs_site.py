r"""The docs site builds cleanly, loads nothing from elsewhere, and the committed `site/` is current.

The site is built twice into temporary directories with the command that builds the
committed one (`mkdocs build`, configured by `mkdocs.yml`, strict): the two builds must
be the same bytes (no date, no absolute path, no order that depends on the machine),
and the committed `site/` must be those bytes too. When it is not, the test says which
files differ and the one command that rebuilds it.
"""

import filecmp
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import require

ROOT = pathlib.Path(__file__).resolve().parent.parent
REBUILD = "mkdocs build   (at the top of the repository, with `pip install -e '.[docs]'` and npm; then commit site/)"

pytestmark = pytest.mark.slow


def _build() -> tuple[pathlib.Path, str]:
    require(
        shutil.which("npm") is not None,
        "building the site needs npm, which installs KaTeX (apt-get install npm)",
    )
    out = pathlib.Path(tempfile.mkdtemp(prefix="sophia-site-"))
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    )
    return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def builds():
    first, log_first = _build()
    second, _ = _build()
    yield first, second, log_first
    shutil.rmtree(first, ignore_errors=True)
    shutil.rmtree(second, ignore_errors=True)


def _tree(root: pathlib.Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
    )


def _differences(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    files_a, files_b = _tree(a), _tree(b)
    out = [f"only in the new build: {f}" for f in sorted(set(files_a) - set(files_b))]
    out += [
        f"only in the committed site/: {f}" for f in sorted(set(files_b) - set(files_a))
    ]
    out += [
        f"differs: {f}"
        for f in sorted(set(files_a) & set(files_b))
        if not filecmp.cmp(a / f, b / f, shallow=False)
    ]
    return out


def test_strict_build_has_no_warnings(builds):
    _, _, log = builds
    assert not re.search(r"^(WARNING|ERROR)", log, re.M), log


def test_every_source_file_has_a_page(builds):
    site, _, _ = builds
    sources = [
        p
        for p in (ROOT / "sophia").rglob("*")
        if p.suffix in {".py", ".cu", ".cuh", ".cpp", ".h"}
    ]
    sources = [p for p in sources if "__pycache__" not in p.parts]
    assert len(sources) > 15
    for path in sources:
        rel = path.relative_to(ROOT / "sophia").as_posix()
        name = rel[: -len(".py")] if path.suffix == ".py" else rel
        page = site / "code" / f"{name}.html"
        assert page.is_file(), f"no literate page for sophia/{rel}"
        assert (
            f"https://github.com/literate-sophia/sophia/blob/main/sophia/{rel}"
            in page.read_text()
        )
    assert (site / "code" / "hooks" / "literate.html").is_file()


def test_nothing_is_loaded_from_elsewhere(builds):
    # Scripts, stylesheets, fonts and images all come from the site itself; links to
    # other sites (`<a href>`, the canonical URL) are fine.
    site, _, _ = builds
    remote = re.compile(r"""^(?:https?:)?//""")
    bad = []
    for page in site.rglob("*.html"):
        html = page.read_text()
        for tag, attr in re.findall(r"<(script|img|iframe|link)\b([^>]*)>", html):
            src = re.search(r'\b(?:src|href)="([^"]*)"', attr)
            if not src or not remote.match(src.group(1)):
                continue
            if tag == "link" and re.search(r'rel="(canonical|alternate)"', attr):
                continue
            bad.append(f"{page.relative_to(site)}: <{tag}{attr}>")
        bad += [
            f"{page.relative_to(site)}: {m}"
            for m in re.findall(r"""import\(\s*["'](?:https?:)?//[^"']+""", html)
        ]
    for css in site.rglob("*.css"):
        bad += [
            f"{css.relative_to(site)}: {m}"
            for m in re.findall(
                r"""(?:url\(|@import\s)\s*["']?(?:https?:)?//[^)"';]+""",
                css.read_text(),
            )
        ]
    assert bad == []
    # Material's web fonts are off, KaTeX's fonts are here.
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()
    assert len(list((site / "assets" / "katex" / "fonts").glob("*.woff2"))) >= 15


def test_pages_are_files_that_work_from_disk(builds):
    # `use_directory_urls: false`: pages are `name.html`, and links point at them.
    site, _, _ = builds
    reference = (site / "code" / "reference.html").read_text()
    assert 'href="foreach.html"' in reference
    # The math is typeset at build time: the page links KaTeX's stylesheet (and fonts),
    # and loads no math JavaScript; a notebook page, whose math is Jupyter's, does.
    assert 'href="../assets/katex/katex.min.css"' in reference
    assert "katex.min.js" not in reference and 'class="katex"' in reference
    notebook = (site / "notebooks" / "01_toy_quadratics.html").read_text()
    assert 'src="../assets/katex/katex.min.js"' in notebook
    assert (site / "search" / "search_index.js").is_file()
    # The directory URLs that links from elsewhere use (`code/reference/`) lead to the pages.
    assert (
        'url=../reference.html"'
        in (site / "code" / "reference" / "index.html").read_text()
    )
    assert not (site / "sitemap.xml").exists()


def test_the_build_is_deterministic(builds):
    first, second, _ = builds
    assert _differences(first, second) == []
    text = "".join(
        p.read_text(errors="replace")
        for p in first.rglob("*")
        if p.suffix in {".html", ".js", ".json", ".xml"}
    )
    assert str(ROOT) not in text, "the site holds an absolute path of this checkout"
    assert str(first) not in text, "the site holds the path it was built into"


def test_committed_site_is_current(builds):
    first, _, _ = builds
    committed = ROOT / "site"
    assert committed.is_dir(), f"site/ is missing; rebuild it with: {REBUILD}"
    differences = _differences(first, committed)
    assert differences == [], (
        f"site/ is stale ({len(differences)} files): rebuild it with: {REBUILD}\n"
        + "\n".join(differences[:30])
    )


def test_pages_are_light(builds):
    # The notebooks share their Jupyter stylesheets instead of inlining a copy each,
    # and describe their plots; the search index holds prose, not the code columns.
    site, _, _ = builds
    for page in sorted((site / "notebooks").glob("*.html")):
        html = page.read_text()
        assert "<style" not in html, f"{page.name} inlines a stylesheet"
        assert "No description has been provided" not in html, page.name
        for href in re.findall(r'href="(\.\./assets/notebooks/[^"]+)"', html):
            assert (page.parent / href).is_file(), href
    index = (site / "search" / "search_index.json").read_text()
    assert "def sophiag_reference" not in index and "sophiag_reference" in index
    # 404.html is shown at any depth: its links are relative, not /sophia/....
    missing = (site / "404.html").read_text()
    assert 'href="/sophia/' not in missing and 'src="/sophia/' not in missing
    assert 'href="assets/stylesheets/' in missing
