r"""The built site in a real browser: headless Chromium reads every page.

The site is built once per test session into a temporary directory (with the same
command as the committed `site/`). Every HTML page is opened over http
(`python -m http.server`'s handler) at 1600x1000 and checked as a reader would see it:
no formula KaTeX could not typeset, no raw `$...$`, `$$` or `\begin{` left in the visible
prose, no console error, every link within the site and every `#anchor` resolves,
exactly one H1, a table of contents where the page has two sections or more, and at
most 1% of the code lines cut off on a literate page. The reference's page is then read
closely (columns, line numbers, search, a phone's width), from disk (`file://`, the
hardest case: no server, so every script, stylesheet and font must be found next to
the page) and over http. Screenshots of the reference, kernel, optimizer and a notebook
page, at a desktop's and a phone's width, go to `test-artifacts/`, which the test run
keeps.

Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's `chromium` and
`chromium-driver`; `.ci/run` installs them). Without them the test skips, except in CI
(`CI=true`), where it fails.
"""

import functools
import http.server
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse

import pytest
from conftest import require

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMEDRIVER = pathlib.Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.slow


def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    require(
        not missing,
        f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)",
    )
    require(
        importlib.util.find_spec("selenium") is not None,
        "the browser test needs selenium (pip install -e '.[dev]')",
    )
    require(
        shutil.which("npm") is not None,
        "building the site needs npm, which installs KaTeX (apt-get install npm)",
    )


@pytest.fixture(scope="module")
def built_site():
    _require_browser()
    out = pathlib.Path(tempfile.mkdtemp(prefix="sophia-site-"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--quiet",
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        f"mkdocs build failed:\n{result.stdout}\n{result.stderr}"
    )
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sophia-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # Chromium, run as root on a closed network, hangs without these.
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(driver, page: pathlib.Path, width: int, height: int):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(width, height)
    driver.get_log("browser")
    driver.get(page.as_uri())
    # KaTeX runs when the page has loaded; wait until it has typeset something.
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return document.querySelectorAll('.katex').length > 0"
        )
    )


def _severe(driver) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
    ]


def _sections_layout(driver) -> list[dict]:
    # For each section that has both prose and code: where each half starts.
    return driver.execute_script(
        """
        return [...document.querySelectorAll('.literate-section')].filter(s =>
            s.querySelector('.literate-prose').textContent.trim() &&
            s.querySelector('.literate-line')).map(s => {
          const p = s.querySelector('.literate-prose').getBoundingClientRect();
          const c = s.querySelector('.literate-code').getBoundingClientRect();
          return {proseLeft: p.left, proseRight: p.right, proseTop: p.top, proseBottom: p.bottom,
                  codeLeft: c.left, codeTop: c.top};
        });
        """
    )


# Type `text` into the search box and wait for at least one result.
def search(browser, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys(text)
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "return document.querySelectorAll('.md-search-result__item').length > 0"
        )
    )


def test_reference_page_on_a_desktop(built_site, browser):
    page = built_site / "code" / "reference.html"
    _open(browser, page, 1600, 1000)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "reference-desktop.png"))

    # Math: KaTeX rendered every formula, and no TeX delimiter is left in the visible
    # text of the prose (the code column is code, and keeps its `$`s if it has any).
    katex = browser.execute_script("return document.querySelectorAll('.katex').length")
    assert katex > 40, f"only {katex} KaTeX elements on the reference page"
    assert (
        browser.execute_script(
            "return document.querySelectorAll('.katex-error').length"
        )
        == 0
    )
    text = browser.execute_script(
        "const c = document.querySelector('article').cloneNode(true);"
        "c.querySelectorAll('.katex, .literate-code, pre, code').forEach(e => e.remove());"
        "return c.innerText;"
    )
    for delimiter in ["$$", "\\[", "\\(", "\\begin{align}"]:
        assert delimiter not in text, (
            f"raw {delimiter!r} left in the page: ...{text[text.find(delimiter) - 80 :][:200]}..."
        )
    assert "$" not in text, (
        f"a raw $ is left in the page: ...{text[text.find('$') - 80 :][:200]}..."
    )
    # A display equation (an `align` inside a paragraph) is typeset in display mode.
    assert (
        browser.execute_script(
            "return document.querySelectorAll('.katex-display').length"
        )
        > 5
    )

    # Two columns: in every section, the code starts to the right of the prose, at the
    # same height.
    sections = _sections_layout(browser)
    assert len(sections) > 5
    for s in sections:
        assert s["codeLeft"] >= s["proseRight"] - 1, s
        assert abs(s["codeTop"] - s["proseTop"]) < 40, s

    # Line numbers: each code line says which line of the file it is, shows that number,
    # and its text is that line of sophia/reference.py.
    source = (ROOT / "sophia" / "reference.py").read_text().splitlines()
    # (The number is drawn by the stylesheet from `data-line`, so the line's text is the
    # code alone, and copying it copies no numbers.)
    rows = browser.execute_script(
        "return [...document.querySelectorAll('.literate-line')].map(l => ["
        "l.dataset.line, getComputedStyle(l, '::before').content, l.textContent])"
    )
    assert len(rows) > 50
    for line, shown, code in rows:
        assert shown == f'"{line}"'
        assert code == source[int(line) - 1], (
            f"line {line}: page shows {code!r}, file has {source[int(line) - 1]!r}"
        )
    numbers = [int(line) for line, _, _ in rows]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)

    # A screenshot of the two columns, at the step's sections.
    browser.execute_script(
        "document.querySelectorAll('.literate-section')[5].scrollIntoView()"
    )
    browser.save_screenshot(str(ARTIFACTS / "reference-desktop-sections.png"))

    # The KaTeX fonts loaded from the site itself (the math would be in a fallback
    # font otherwise).
    assert browser.execute_script("return document.fonts.check('16px KaTeX_Main')")
    assert _severe(browser) == [], "console errors on the reference page"

    # Search works from disk too (the index is inlined, the worker runs in the shim).

    search(browser, "hessian_ema_reference")
    assert _severe(browser) == [], "console errors while searching"


def test_reference_page_on_a_phone(built_site, browser):
    _open(browser, built_site / "code" / "reference.html", 390, 844)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "reference-phone.png"))
    # On a phone the prose stacks above its code.
    sections = _sections_layout(browser)
    assert len(sections) > 5
    for s in sections:
        assert s["codeTop"] >= s["proseBottom"] - 1, s
        assert abs(s["codeLeft"] - s["proseLeft"]) < 2, s
    assert _severe(browser) == [], "console errors on the reference page (phone)"


def test_every_page_loads_without_console_errors(built_site, browser):
    # The other pages, from disk too: navigation, search (by the shim), notebooks.
    pages = sorted(p for p in built_site.rglob("*.html") if p.name != "404.html")
    assert len(pages) > 20
    errors = {}
    for page in pages:
        browser.set_window_size(1400, 900)
        browser.get_log("browser")
        browser.get(page.as_uri())
        bad = _severe(browser)
        if bad:
            errors[page.relative_to(built_site).as_posix()] = bad
    assert errors == {}


@pytest.fixture(scope="module")
def served(built_site):
    # The built site over http, as `python -m http.server` serves it; yields its URL.
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(built_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_reference_page_served_over_http(served, browser):
    # The same page over http: math, code and search (which, over HTTP, runs in a web
    # worker and fetches the JSON index when the search box is first focused) all work.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(1400, 900)
    browser.get_log("browser")
    browser.get(f"{served}/code/reference.html")
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "return document.querySelectorAll('.katex').length > 40"
        )
    )
    assert (
        browser.execute_script(
            "return document.querySelectorAll('.literate-line').length"
        )
        > 50
    )
    # Navigation: the tabs lead to the other parts of the site.
    tabs = [
        a.get_attribute("href")
        for a in browser.find_elements(By.CSS_SELECTOR, ".md-tabs__link")
    ]
    assert any(t.endswith("/index.html") for t in tabs) and any(
        "/notebooks/" in t for t in tabs
    )
    # Search finds the reference's step function (named in the prose; the code itself
    # is left out of the index).
    search(browser, "sophiag_reference")
    assert _severe(browser) == []


# ## Every page
#
# One script reads what a reader sees: the KaTeX errors, the visible prose (without
# math, code and scripts), the H1s, the sections and the table of contents, the links,
# and which code lines end beyond the right edge of their box.
PAGE_FACTS = """
const article = document.querySelector('article');
const prose = article.cloneNode(true);
prose.querySelectorAll('.katex, .katex-error, pre, code, script, style, .literate-code,'
  + ' .highlight, .jp-InputArea, .jp-OutputArea').forEach(e => e.remove());
const cut = [...document.querySelectorAll('.literate-line')].filter(line => {
  const pre = line.closest('pre');
  const box = pre.getBoundingClientRect();
  const range = document.createRange();
  range.selectNodeContents(line);
  const rects = [...range.getClientRects()];
  return rects.some(r => r.right > box.left + pre.clientWidth + 1);
}).length;
const toc = document.querySelector('.md-sidebar--secondary');
return {
  katexErrors: [...document.querySelectorAll('.katex-error')].map(e => e.textContent),
  prose: prose.innerText,
  h1: article.querySelectorAll('h1').length,
  sections: article.querySelectorAll('h2[id]').length,
  tocLinks: toc && toc.offsetParent !== null && !toc.hidden
    ? toc.querySelectorAll('.md-nav__link[href]').length : 0,
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  lines: document.querySelectorAll('.literate-line').length,
  cut: cut,
};
"""
RAW_TEX = [
    ("$$", re.compile(r"\$\$")),
    ("\\begin{", re.compile(r"\\begin\{")),
    ("\\(", re.compile(r"\\\(")),
    ("$...$", re.compile(r"(?<![\w$])\$[^\s$][^$\n]{0,80}?(?<!\s)\$(?![\w$])")),
]


def _pages(site: pathlib.Path) -> list[str]:
    # Every page, but not the one-line redirects at the directory URLs.
    return sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("*.html")
        if 'http-equiv="refresh"' not in p.read_text(encoding="utf-8")[:600]
    )


def _ids(page: pathlib.Path) -> set[str]:
    return set(re.findall(r'\sid="([^"]+)"', page.read_text(encoding="utf-8")))


def _dangling(site: pathlib.Path, base: str, links: list[str]) -> list[str]:
    # Each link into the site names a file that exists, and an anchor that it holds.
    bad = []
    for link in dict.fromkeys(links):
        if not link.startswith(base + "/"):
            continue
        url = urllib.parse.urlsplit(link)
        path = urllib.parse.unquote(url.path).lstrip("/") or "index.html"
        target = site / path
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            bad.append(link)
        elif url.fragment and target.suffix == ".html":
            if urllib.parse.unquote(url.fragment) not in _ids(target):
                bad.append(link)
    return bad


def _read(browser, url: str) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")
    browser.get(url)
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    # The notebooks typeset their math in the browser, when the page has loaded.
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "return !document.querySelector('.jupyter-wrapper') ||"
            " document.querySelectorAll('.katex').length > 0"
        )
    )
    facts = browser.execute_script(PAGE_FACTS)
    facts["console"] = _severe(browser)
    return facts


def _problems(facts: dict, site: pathlib.Path, base: str) -> list[str]:
    problems = []
    if facts["katexErrors"]:
        problems.append(f"KaTeX could not typeset {facts['katexErrors'][:3]}")
    for name, pattern in RAW_TEX:
        found = pattern.search(facts["prose"])
        if found:
            at = facts["prose"][max(found.start() - 60, 0) : found.end() + 60]
            problems.append(f"raw {name} in the prose: ...{at!r}...")
    if facts["console"]:
        problems.append(f"console errors: {facts['console'][:3]}")
    if facts["h1"] != 1:
        problems.append(f"{facts['h1']} H1 titles")
    if facts["sections"] >= 2 and facts["tocLinks"] == 0:
        problems.append(f"{facts['sections']} sections and no table of contents")
    if facts["cut"] > 0.01 * facts["lines"]:
        problems.append(f"{facts['cut']} of {facts['lines']} code lines cut off")
    dangling = _dangling(site, base, facts["links"])
    if dangling:
        problems.append(f"dangling links {dangling[:5]}")
    return problems


def test_every_page_reads_cleanly_over_http(built_site, served, browser):
    browser.set_window_size(1600, 1000)
    pages = _pages(built_site)
    assert len(pages) > 30 and "404.html" in pages
    found = {}
    for page in pages:
        problems = _problems(_read(browser, f"{served}/{page}"), built_site, served)
        if problems:
            found[page] = problems
    assert found == {}, "\n".join(f"{p}: {q}" for p, q in found.items())


SCREENSHOTS = {
    "reference": "code/reference.html",
    "kernel": "code/csrc/sophia_kernel.cuh.html",
    "optimizer": "code/optimizer.html",
    "notebook": "notebooks/01_toy_quadratics.html",
}


def test_screenshots_at_a_desktop_and_a_phone_width(served, browser):
    # The pages a reader is sent to first, kept for a person to look at; each shot is
    # taken at a section with code, where the two columns (or their stacking) show.
    ARTIFACTS.mkdir(exist_ok=True)
    for name, page in SCREENSHOTS.items():
        for width, height, kind in [(1600, 1000, "desktop"), (390, 844, "phone")]:
            browser.set_window_size(width, height)
            browser.get(f"{served}/{page}")
            browser.execute_script(
                "const s = document.querySelectorAll('.literate-section, .jp-Cell');"
                "if (s.length > 3) s[3].scrollIntoView();"
            )
            out = ARTIFACTS / f"site-{name}-{kind}.png"
            browser.save_screenshot(str(out))
            assert out.stat().st_size > 10_000, f"{out} is (nearly) empty"
