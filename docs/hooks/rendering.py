r"""What the browser would otherwise do, done once at build time.

A second MkDocs hook, beside `literate.py` (which makes the pages); this one finishes
them:

1. **Math**: every formula of the Markdown pages (Arithmatex's `\(...\)` and `\[...\]`,
   and the display math that `literate.py` keeps inside paragraphs) is typeset by
   KaTeX under node (`docs/npm/render.js`), so those pages load no math JavaScript and
   a formula KaTeX cannot parse fails the build (strict) with the source file and line.
   The notebooks keep Jupyter's `$...$` and are typeset in the browser (their math is
   checked here too, by cell).
2. **Notebooks**: the Jupyter stylesheets that `mkdocs-jupyter` inlines in each page
   are written once under `assets/notebooks/` and linked; the plots get the figure's
   title as alt text.
3. **404.html**: its asset links are made relative, so that it is styled wherever the
   site is served from, or read from disk.
"""

from __future__ import annotations

import ast
import hashlib
import html as htmllib
import json
import logging
import pathlib
import posixpath
import re
import shutil
import subprocess

from mkdocs.plugins import event_priority

log = logging.getLogger("mkdocs.hooks.rendering")


def _root(config) -> pathlib.Path:
    return pathlib.Path(config.config_file_path).resolve().parent


# ## KaTeX under node
#
# One node process for the whole build, one JSON line per formula each way. The same
# formula is typeset once.
class KaTeX:
    def __init__(self, root: pathlib.Path):
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise RuntimeError(
                "rendering: the docs typeset math with node, which is not on PATH "
                "(apt-get install nodejs)"
            )
        katex = root / ".cache" / "npm" / "node_modules" / "katex"
        script = root / "docs" / "npm" / "render.js"
        self.process = subprocess.Popen(
            [node, str(script), str(katex)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.cache: dict[tuple[str, bool], dict] = {}

    def render(self, tex: str, display: bool) -> dict:
        key = (tex, display)
        if key not in self.cache:
            request = json.dumps({"tex": tex, "display": display})
            self.process.stdin.write(request + "\n")
            self.process.stdin.flush()
            self.cache[key] = json.loads(self.process.stdout.readline())
        return self.cache[key]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


_katex: KaTeX | None = None


def katex(config) -> KaTeX:
    global _katex
    if _katex is None:
        _katex = KaTeX(_root(config))
    return _katex


# ## Where a formula came from
#
# The page's Markdown source, or for a literate page the source file its front matter
# names; the line is the first that holds the formula's first line of TeX.
def source_of(page, config) -> tuple[str, list[str]]:
    root = _root(config)
    name = page.meta.get("source")
    path = root / name if name else pathlib.Path(page.file.abs_src_path or "")
    if not path.is_file():
        return page.file.src_uri, []
    text = path.read_text(encoding="utf-8")
    return path.relative_to(root).as_posix(), text.splitlines()


def line_of(tex: str, lines: list[str]) -> int | str:
    needle = next((t.strip() for t in tex.splitlines() if t.strip()), tex)
    for number, line in enumerate(lines, start=1):
        if needle in line:
            return number
    return "?"


# ## Typesetting a Markdown page
#
# Arithmatex writes `<span class="arithmatex">\(...\)</span>` (display: `\[...\]`, or a
# `\begin{...}` environment) and a `div` for a display block of its own; the TeX inside
# is HTML-escaped.
ARITHMATEX = re.compile(
    r'<(span|div) class="arithmatex">(.*?)</\1>',
    re.S,
)


def typeset(html: str, page, config) -> str:
    where, lines = None, []
    renderer = katex(config)

    def replace(match: re.Match) -> str:
        nonlocal where, lines
        tag, tex = match.group(1), htmllib.unescape(match.group(2)).strip()
        display = not tex.startswith("\\(")
        if tex[:2] in ("\\(", "\\["):
            tex = tex[2:-2]
        answer = renderer.render(tex, display)
        if "html" in answer:
            return (
                answer["html"]
                if tag == "span" or not display
                else (f'<div class="arithmatex">{answer["html"]}</div>')
            )
        if where is None:
            where, lines = source_of(page, config)
        log.warning(
            "rendering: %s:%s: KaTeX cannot parse $%s$: %s",
            where,
            line_of(tex, lines),
            tex,
            answer["error"],
        )
        return f'<span class="katex-error">{htmllib.escape(tex)}</span>'

    return ARITHMATEX.sub(replace, html)


# ## The notebooks' math, checked by cell
#
# `$$...$$` and `$...$` in the notebook's Markdown cells, outside code spans.
NOTEBOOK_MATH = re.compile(
    r"\$\$(.+?)\$\$|(?<![\\$])\$(?!\s)([^$\n]+?)(?<![\s\\])\$", re.S
)


def check_notebook(path: pathlib.Path, root: pathlib.Path, config) -> None:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for index, cell in enumerate(cells, start=1):
        if cell["cell_type"] != "markdown":
            continue
        text = re.sub(r"`[^`]*`", "", "".join(cell["source"]))
        for match in NOTEBOOK_MATH.finditer(text):
            tex = match.group(1) if match.group(1) is not None else match.group(2)
            answer = katex(config).render(tex, match.group(1) is not None)
            if "error" in answer:
                log.warning(
                    "rendering: %s, cell %d: KaTeX cannot parse $%s$: %s",
                    path.relative_to(root).as_posix(),
                    index,
                    tex,
                    answer["error"],
                )


# ## The notebooks' plots: alt text from the figure's title
#
# A code cell's plots are described by the titles its source sets (`suptitle`, or the
# axes' `title`s, as string literals); a plot from a cell that sets none by the cell's
# first comment line, or else by the first line of the Markdown cell before it.
def figure_titles(source: str) -> str:
    titles = []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    for node in ast.walk(tree) if tree else []:
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        values = [k.value for k in node.keywords if k.arg == "title"]
        if name in ("suptitle", "set_title", "title") and node.args:
            values.insert(0, node.args[0])
        for value in values:
            text = _literal_text(value)
            if text:
                (titles.insert(0, text) if name == "suptitle" else titles.append(text))
    if titles:
        return "; ".join(dict.fromkeys(titles))
    comments = [
        line[1:].strip() for line in source.splitlines() if line.startswith("#")
    ]
    return comments[0] if comments else ""


def _literal_text(node) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else "…" for v in node.values
        )
    return ""


def plot_descriptions(path: pathlib.Path) -> list[str]:
    out, before = [], ""
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            before = source.strip().lstrip("#").strip().split("\n")[0]
            continue
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                out.append(figure_titles(source) or before or "A plot")
    return out


NO_DESCRIPTION = 'alt="No description has been provided for this image"'


def describe_plots(html: str, descriptions: list[str]) -> str:
    parts = html.split(NO_DESCRIPTION)
    out = [parts[0]]
    for index, part in enumerate(parts[1:]):
        text = descriptions[index] if index < len(descriptions) else "A plot"
        out.append(f'alt="{htmllib.escape(text.replace("$", ""))}"' + part)
    return "".join(out)


# ## The notebooks' stylesheets, once
#
# Each inline `<style>` of a notebook page becomes `assets/notebooks/<hash>.css`,
# written once however many pages share it.
STYLE = re.compile(r"<style[^>]*>(.*?)</style>", re.S)
_stylesheets: dict[str, str] = {}


def share_styles(html: str, page) -> str:
    here = posixpath.dirname(page.file.dest_uri)

    def replace(match: re.Match) -> str:
        css = match.group(1)
        uri = f"assets/notebooks/{hashlib.sha256(css.encode()).hexdigest()[:12]}.css"
        _stylesheets[uri] = css
        href = posixpath.relpath(uri, here or ".")
        return f'<link rel="stylesheet" href="{href}">'

    return STYLE.sub(replace, html)


KATEX_SCRIPTS = [
    "assets/katex/katex.min.js",
    "assets/katex/contrib/auto-render.min.js",
    "javascripts/katex.js",
]


def notebook_page(html: str, page, config) -> str:
    root = _root(config)
    path = root / page.file.src_uri
    if not path.is_file():
        path = pathlib.Path(page.file.abs_src_path)
    check_notebook(path, root, config)
    html = describe_plots(share_styles(html, page), plot_descriptions(path))
    here = posixpath.dirname(page.file.dest_uri) or "."
    scripts = "".join(
        f'<script src="{posixpath.relpath(s, here)}"></script>' for s in KATEX_SCRIPTS
    )
    return html + scripts


# After the search plugin has indexed the page (in this same event): the index keeps
# the TeX, not KaTeX's three copies of each formula.
@event_priority(-100)
def on_page_context(context, page, config, nav):
    if page.file.src_uri.endswith(".ipynb"):
        page.content = notebook_page(page.content, page, config)
    else:
        page.content = typeset(page.content, page, config)
    return context


# ## Math in the navigation
#
# A heading's math is typeset in the page, and its entry in the table of contents (a
# `md-ellipsis` span, of text) is typeset here, inline.
NAV_ENTRY = re.compile(r'(<span class="md-ellipsis">)(.*?)(</span>)', re.S)
INLINE_MATH = re.compile(r"\\\((.+?)\\\)", re.S)


def on_post_page(output: str, page, config) -> str:
    if page.file.src_uri.endswith(".ipynb"):
        return notebook_anchors(output)
    renderer = katex(config)

    def formula(match: re.Match) -> str:
        answer = renderer.render(htmllib.unescape(match.group(1)), False)
        return answer.get("html", match.group(0))

    def entry(match: re.Match) -> str:
        return (
            match.group(1) + INLINE_MATH.sub(formula, match.group(2)) + match.group(3)
        )

    return NAV_ENTRY.sub(entry, output)


# ## The notebooks' table of contents
#
# `mkdocs-jupyter` makes the contents' anchors without a heading's code spans
# (`#...-the-authors` for the heading "... the authors' `+ 1e-15`", whose id ends in
# `-1e-15`). An anchor that names no id is pointed at the one id that begins with it.
def notebook_anchors(output: str) -> str:
    ids = set(re.findall(r'\sid="([^"]+)"', output))

    def replace(match: re.Match) -> str:
        anchor = match.group(1)
        if anchor in ids:
            return match.group(0)
        near = [i for i in ids if i.startswith(anchor + "-")]
        return f'href="#{near[0]}"' if len(near) == 1 else match.group(0)

    return re.sub(r'href="#([^"]+)"', replace, output)


# ## 404.html, relative
#
# MkDocs writes the error page's links from the site's URL (`/sophia/...`), since the
# server shows it at any depth; relative links serve the published site (whose 404 is
# served at the top) and the site read from disk alike.
def on_post_template(output: str, template_name: str, config) -> str:
    if template_name != "404.html" or not config.site_url:
        return output
    base = "/" + config.site_url.split("://", 1)[-1].partition("/")[2].strip("/")
    if base == "/":
        return output
    output = re.sub(rf'(href|src)="{re.escape(base)}/', r'\1="', output)
    return re.sub(rf'"base": "{re.escape(base)}/?"', '"base": "."', output)


def on_post_build(config) -> None:
    global _katex
    site = pathlib.Path(config.site_dir)
    for uri, css in sorted(_stylesheets.items()):
        target = site / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(css, encoding="utf-8")
    _stylesheets.clear()
    if _katex is not None:
        _katex.close()
        _katex = None
