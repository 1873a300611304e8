r"""The built site in a real browser: headless Chromium opens the literate page of the reference.

The site is built once per test session into a temporary directory (with the same
command as the committed `site/`) and opened from disk, `file://`, the hardest case:
no server, so every script, stylesheet and font must be found next to the page. The
test checks that the math was typeset by KaTeX, that prose and code sit side by side on
a desktop and stack on a phone, that each code line carries the number of that line in
`sophia/reference.py`, and that the console shows no error. Screenshots go to
`test-artifacts/`, which the test run keeps.

Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's `chromium` and
`chromium-driver`; `.ci/run` installs them). Without them the test skips, except in CI
(`CI=true`), where it fails.
"""

import functools
import http.server
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

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
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys("hessian_ema_reference")
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "return document.querySelectorAll('.md-search-result__item').length > 0"
        )
    )
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


def test_reference_page_served_over_http(built_site, browser):
    # The same page from `python -m http.server`: math, code and search (which, over
    # HTTP, runs in a web worker and loads the JSON index) all work.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(built_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.set_window_size(1400, 900)
        browser.get_log("browser")
        browser.get(f"http://127.0.0.1:{server.server_port}/code/reference.html")
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
        # Search finds the reference's step function.
        box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
        box.click()
        box.send_keys("sophiag_reference")
        WebDriverWait(browser, 30).until(
            lambda d: d.execute_script(
                "return document.querySelectorAll('.md-search-result__item').length > 0"
            )
        )
        assert _severe(browser) == []
    finally:
        server.shutdown()
        server.server_close()
