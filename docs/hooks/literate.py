r"""
---
title: How this site is made
summary: A MkDocs hook that turns every source file into a two-column literate page, serves KaTeX from the site itself, and brings the notebooks in.
---

# How this site is made

Every source file of the package, the CUDA kernel included, is a page of this site:
the prose and math of its comments on the left, the code they explain on the right,
section by section, with the file's real line numbers. This file is the MkDocs
[hook](https://www.mkdocs.org/user-guide/configuration/#hooks) that makes those pages,
and it is itself one of them.

It does its work in five MkDocs events:

1. **`on_config`**: fixes the build date, so that the same sources give the same
   bytes, and teaches Markdown display math in the middle of a paragraph;
2. **`on_files`**: parses each source file into sections and adds a generated page
   for it, brings in the notebooks from `notebooks/`, and installs KaTeX with `npm`
   from the lockfile in `docs/npm/`, to be served from the site itself;
3. **`on_page_content`**: puts the highlighted code into each section, takes the
   scripts that would load MathJax from a CDN out of the notebook pages, and turns
   links to the published site into links within the site;
4. **`on_post_page`**: notes each page, for
5. **`on_post_build`**: which writes a redirect at each page's directory URL
   (`code/reference/` to `code/reference.html`), and removes the sitemap, whose only
   content would be a date.

The whole site is rebuilt by `mkdocs build` at the top of the repository; a test
rebuilds it and compares it with the committed `site/`.

## The parser

A file is read as a sequence of lines, each of which is one of three kinds:

* **prose**: a full-line comment (`# ...` in Python, `// ...` in C++), with nothing but
  indentation before it;
* **docstring**: a line of the module's docstring (or, in C++, of the `/* ... */`
  block that opens the file), or of a function's or a class's docstring;
* **code**: everything else, blank lines included.

Which lines are comments is decided by [Pygments](https://pygments.org)' lexers, not by
looking for `#`: a `#` inside a string (`"#"`, or a line of a triple-quoted string)
is a string, and so is a `//` inside a C string. A run of prose lines opens a
section; the code that follows, up to the next prose line, is that section's code. So
a comment in the middle of a function opens a section in the middle of the function,
and its code keeps its indentation. A docstring of a function or a class joins the
prose of the section its `def` is in: it is documentation, and it reads better on the
left.
"""

from __future__ import annotations

import ast
import dataclasses
import filecmp
import logging
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import xml.etree.ElementTree as etree
from html import escape as html_escape

import yaml
from markdown import Extension
from markdown.inlinepatterns import InlineProcessor
from markdown.util import AtomicString
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.token import Comment

log = logging.getLogger("mkdocs.hooks.literate")

# ## What becomes a page
#
# The sources of the package, `sophia/**/*.py` and the C++ and CUDA files of
# `sophia/csrc/`, and this hook. Each gets a page at `code/<path>.md`, where `<path>` is
# its path under `sophia/` (for this hook: `hooks/literate`), without the extension for
# Python and with it for C++, so that `sophia_launcher.cu` and `sophia_launcher.h` get
# two pages.
REPOSITORY = "https://github.com/literate-sophia/sophia"
BRANCH = "main"
SOURCE_SUFFIXES = {
    ".py": "python",
    ".cu": "cpp",
    ".cuh": "cpp",
    ".cpp": "cpp",
    ".h": "cpp",
}
COMMENT_MARKERS = {"python": "#", "cpp": "//"}

# A relative link `name.html` in a module's prose is a link to another module's page;
# when a name could be several files (`sophia_launcher.cu` and `.h`), the first suffix
# here wins: the implementation before its header.
LINK_PREFERENCE = [".py", ".cu", ".cuh", ".cpp", ".h"]

# The notebooks, by name, and which of them each page links to, by the
# page's path under `code/`. A page whose notebook is not in `notebooks/` links to none.
NOTEBOOKS = [
    "01_toy_quadratics.ipynb",
    "02_hessian_estimators.ipynb",
    "03_small_transformer.ipynb",
    "04_cuda_kernel.ipynb",
]
RELATED_NOTEBOOKS = {
    "__init__": [0],
    "__main__": [0],
    "reference": [0],
    "foreach": [0, 3],
    "optimizer": [0, 2],
    "hessian": [1],
    "fused": [3],
    "csrc/": [3],
    "experiments/demo": [0],
    "experiments/benchmark": [3],
    "experiments/measure": [3],
    "experiments/": [2],
}


# A page's own entry wins over its folder's (`experiments/demo` over `experiments/`).
def related_notebooks(page: str) -> list[int]:
    name = page[len("code/") : -len(".md")]
    folder, _, _ = name.rpartition("/")
    return RELATED_NOTEBOOKS.get(name, RELATED_NOTEBOOKS.get(f"{folder}/", []))


# The build date. MkDocs honours `SOURCE_DATE_EPOCH` wherever it writes a date; we fix
# it, so that two builds of the same sources, on any machine, on any day, are the same
# bytes. (2026-01-01, 00:00 UTC; no page shows it as a date.)
SOURCE_DATE_EPOCH = "1767225600"


# ## A parsed file
#
# A `Section` is one row of the page: its prose (Markdown) and its code, as
# `(line number, line)` pairs with the file's own numbers, and the number of its first
# line, which names its anchor (`#L142`). A `Literate` file is the
# front matter, the prose of the opening docstring, and the sections.
@dataclasses.dataclass
class Section:
    prose: list[str] = dataclasses.field(default_factory=list)
    code: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    start: int = 0


@dataclasses.dataclass
class Literate:
    meta: dict
    intro: str
    sections: list[Section]
    language: str


# ## Front matter
#
# A docstring may open with YAML between two `---` lines: the page's `title` and
# `summary`. What follows is the page's introduction. A docstring without front matter
# is all introduction.
def split_front_matter(text: str) -> tuple[dict, str]:
    lines = text.strip("\n").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, text.strip("\n")
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            meta = yaml.safe_load("\n".join(lines[1:end])) or {}
            if not isinstance(meta, dict):
                raise ValueError(
                    f"front matter must be a mapping of keys to values, got {meta!r}"
                )
            return meta, "\n".join(lines[end + 1 :]).strip("\n")
    raise ValueError(
        "front matter opens with '---' but is never closed by another '---'"
    )


# ## Comments, by the lexer
#
# The lexer's tokens come with their offset in the text. A token is a prose comment
# when it is a one-line comment (`Comment.Single`, which is neither a preprocessor
# line nor a `#!` line) and only whitespace stands between the start of its line and
# it. Its text is the comment without its marker and one following space, so that
# `#   $$...` keeps the indentation that Markdown may need; a bare `#` is an empty line,
# which Markdown reads as a paragraph break.
def comment_lines(source: str, language: str) -> dict[int, str]:
    marker = COMMENT_MARKERS[language]
    lexer = get_lexer_by_name(language, stripnl=False, ensurenl=True)
    starts = [0] + [i + 1 for i, c in enumerate(source) if c == "\n"]
    prose = {}
    line = 0
    for offset, token, value in lexer.get_tokens_unprocessed(source):
        while line + 1 < len(starts) and starts[line + 1] <= offset:
            line += 1
        if token is not Comment.Single or not value.startswith(marker):
            continue
        if source[starts[line] : offset].strip():
            continue
        text = value.rstrip("\n")[len(marker) :]
        prose[line + 1] = text[1:] if text.startswith(" ") else text
    return prose


# ## Docstrings
#
# In Python, `ast` finds them: the module's, and each function's and class's, with the
# lines they span. `ast.get_docstring` removes the common indentation. The module's
# docstring becomes the introduction; the others, prose of their section (keyed by
# their first line).
#
# In C++ the "docstring" is the `/* ... */` comment that opens the file, if one does.
def python_docstrings(source: str) -> tuple[str | None, set[int], dict[int, str]]:
    tree = ast.parse(source)
    module_doc, hidden, docs = None, set(), {}
    for node in ast.walk(tree):
        if not isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        ):
            continue
        text = ast.get_docstring(node, clean=True)
        if text is None:
            continue
        first = node.body[0]
        hidden.update(range(first.lineno, first.end_lineno + 1))
        if isinstance(node, ast.Module):
            module_doc = text
        else:
            docs[first.lineno] = text
    return module_doc, hidden, docs


def cpp_docstring(source: str) -> tuple[str | None, set[int]]:
    match = re.match(r"\s*/\*(.*?)\*/[ \t]*\n?", source, re.S)
    if not match:
        return None, set()
    last = source.count("\n", 0, match.end() - 1) + 1
    return match.group(1), set(range(1, last + 1))


# ## Sections
#
# One pass over the lines. A prose line opens a new section unless the current one
# has only prose so far; a code line (blank lines included) joins the current section.
# So a comment block, a blank line, and another comment block are two sections, the
# first with no code: a section of prose alone, such as a derivation. Blank lines at
# either end of a section's code are dropped; the rest keep their numbers.
def parse(source: str, language: str) -> Literate:
    source = source.replace("\r\n", "\n")
    if language == "python":
        intro, hidden, docs = python_docstrings(source)
    else:
        (intro, hidden), docs = cpp_docstring(source), {}
    prose = comment_lines(source, language)
    sections: list[Section] = []
    for number, line in enumerate(source.splitlines(), start=1):
        if number in docs:
            if not sections:
                sections.append(Section(start=number))
            sections[-1].prose += ["", *docs[number].splitlines()]
        if number in hidden:
            continue
        if number in prose:
            if not sections or sections[-1].code:
                sections.append(Section(start=number))
            sections[-1].prose.append(prose[number])
        elif sections or line.strip():
            if not sections:
                sections.append(Section(start=number))
            sections[-1].code.append((number, line))
    for section in sections:
        while section.code and not section.code[-1][1].strip():
            section.code.pop()
        while section.code and not section.code[0][1].strip():
            section.code.pop(0)
    meta, body = split_front_matter(intro or "")
    return Literate(meta, body, sections, language)


# ## Links between pages
#
# The modules' prose links to its neighbours as `foreach.html` or `../reference.html`,
# relative to the file itself. We resolve each such link to the page of the file it
# names and write it as a link to that page's Markdown source, which MkDocs then checks
# (a build with `--strict` fails on a broken one) and turns into the right URL. A link
# that names no file is left alone and reported.
HTML_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|/|#)([^()\s]+?)\.html(#[^()\s]*)?\)")


def resolve_links(text: str, source: str, page: str, pages: dict[str, str]) -> str:
    here = posixpath.dirname(page)

    def replace(match: re.Match) -> str:
        stem = posixpath.normpath(
            posixpath.join(posixpath.dirname(source), match.group(1))
        )
        for suffix in LINK_PREFERENCE:
            target = pages.get(stem + suffix)
            if target is not None:
                return (
                    f"]({posixpath.relpath(target, here or '.')}{match.group(2) or ''})"
                )
        log.warning(
            "literate: %s links to %s.html, which is no source file",
            source,
            match.group(1),
        )
        return match.group(0)

    return HTML_LINK.sub(replace, text)


# ## Display math inside a paragraph
#
# The modules write display math where it falls in a sentence, `...: $$m_t = ...$$ No
# bias...`, and derivations as `\begin{align}...\end{align}`, also inside a paragraph.
# Arithmatex only knows these as blocks of their own, so without help Markdown would
# read the `$$` as two stray dollars around an inline formula, and the `\\` of an
# `align` as an escaped backslash. This inline pattern runs before Arithmatex's and
# before Markdown's escapes (but after code spans, so `` `$$` `` stays code): it keeps
# the TeX exactly as written, in a `span` that KaTeX renders in display mode.
DISPLAY_MATH = r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|\\begin\{([a-z]+\*?)\}(.+?)\\end\{\2\}"


class DisplayMathProcessor(InlineProcessor):
    def handleMatch(self, m, data):
        element = etree.Element("span", {"class": "arithmatex"})
        if m.group(1) is not None:
            element.text = AtomicString(f"\\[{m.group(1)}\\]")
        else:
            element.text = AtomicString(m.group(0))
        return element, m.start(0), m.end(0)


class DisplayMathExtension(Extension):
    def extendMarkdown(self, md):
        md.inlinePatterns.register(
            DisplayMathProcessor(DISPLAY_MATH, md), "display-math-inline", 189.95
        )


# ## The page, in Markdown
#
# The front matter carries the title and, as `description`, the summary (which the
# theme puts in the page's `<meta>`), and the source's path (for the math hook's error
# messages). The title is the front matter's, else the introduction's leading `# `
# heading, else the file's path; the leading heading is dropped either way, so that a
# page has one title. A title made from a path is escaped (`__main__.py` is no bold
# "main.py"). The header repeats the title, states the summary, and links to the source
# on GitHub and to the related notebooks. Each section is a `div` in two halves: its
# prose, rendered by Markdown (`md_in_html`), with a permalink to the section's first
# line (`#L142`, shown on hover), and an empty code `div` that `on_page_content` fills,
# so that Markdown never sees the code. The code stays out of the search index
# (`data-search-exclude`): searching finds the prose that explains it. A page whose
# prose has no headings hides the table of contents, whose column would be empty.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|!])")
HEADING = re.compile(r"^#{1,6} ", re.M)


def page_title(lit: Literate, source: str) -> tuple[str, str]:
    first, _, rest = lit.intro.partition("\n")
    heading = first[2:].strip() if first.startswith("# ") else ""
    intro = rest.strip("\n") if heading else lit.intro
    if lit.meta.get("title"):
        return str(lit.meta["title"]), intro
    return heading or MARKDOWN_SPECIAL.sub(r"\\\1", source), intro


def to_markdown(
    lit: Literate,
    source: str,
    page: str,
    source_url: str,
    notebooks: list[str],
    pages: dict[str, str],
) -> str:
    title, intro = page_title(lit, source)
    summary = str(lit.meta.get("summary") or "")
    prose = [
        resolve_links("\n".join(s.prose), source, page, pages) for s in lit.sections
    ]
    hide = ["navigation"]
    if not any(HEADING.search(text) for text in [intro, *prose]):
        hide.append("toc")
    front = yaml.safe_dump(
        {
            "title": title.replace("\\", ""),
            "description": summary,
            "hide": hide,
            "source": source_url.rpartition(f"/blob/{BRANCH}/")[2] or source,
        },
        sort_keys=True,
    )
    here = posixpath.dirname(page)
    links = [f"[Source on GitHub]({source_url})"]
    for name in notebooks:
        target = posixpath.relpath(f"notebooks/{name}", here)
        number, words = name[:2].lstrip("0"), name[3:-6].replace("_", " ")
        links.append(f"[Notebook {number}: {words}]({target})")
    out = [f"---\n{front}---\n", f"# {title}\n"]
    if summary:
        out.append(f'<p class="literate-summary" markdown>{summary}</p>\n')
    out.append('<p class="literate-links" markdown>' + " · ".join(links) + "</p>\n")
    out.append('<div class="literate-page" markdown>\n')
    if intro:
        out.append(resolve_links(intro, source, page, pages) + "\n")
    for index, (section, text) in enumerate(zip(lit.sections, prose)):
        anchor = f"L{section.start}"
        out.append(
            f'<div class="literate-section" id="{anchor}" markdown>\n'
            f'<div class="literate-prose" markdown>\n'
            f'<a class="literate-permalink" href="#{anchor}" data-search-exclude '
            f'title="Link to line {section.start}">¶</a>\n\n{text}\n\n</div>\n'
            f'<div class="literate-code" data-section="{index}">'
            "</div>\n</div>\n"
        )
    out.append("</div>\n")
    return "\n".join(out)


# ## The code, highlighted
#
# Pygments highlights the whole file at once, so that each line is coloured in its
# context (a line inside a triple-quoted string is a string), and its HTML formatter
# closes every `span` at the end of a line, so the output splits into the file's lines.
# Each section shows its own lines, each with its real number: a `span` per line whose
# `data-line` is the number, which the stylesheet shows in the margin (as generated
# content, so that copying the code copies no numbers) and a test compares with the file.
# A line too long for the column wraps, its continuation indented past the line's own
# indentation (`--indent`, in characters), under the same number.
def highlight_lines(source: str, language: str) -> list[str]:
    lexer = get_lexer_by_name(language, stripnl=False, ensurenl=True)
    html = highlight(source.replace("\r\n", "\n"), lexer, HtmlFormatter(nowrap=True))
    return html.split("\n")


def code_html(section: Section, lines: list[str]) -> str:
    rows = "".join(
        f'<span class="literate-line" data-line="{n}" '
        f'style="--indent: {len(text) - len(text.lstrip())}">{lines[n - 1]}</span>\n'
        for n, text in section.code
    )
    return f'<div class="highlight"><pre><code>{rows}</code></pre></div>'


# ## Hook state
#
# What `on_files` parsed, for `on_page_content` to fill in: per page, the sections and
# the highlighted lines of its file.
_parsed: dict[str, tuple[Literate, list[str]]] = {}


def _root(config) -> pathlib.Path:
    return pathlib.Path(config.config_file_path).resolve().parent


def on_config(config):
    os.environ["SOURCE_DATE_EPOCH"] = SOURCE_DATE_EPOCH
    config.markdown_extensions.append(DisplayMathExtension())
    return config


# ## Which files, and where their pages go
#
# Keyed by the source's path under `sophia/` (`csrc/sophia_kernel.cuh`, `reference.py`),
# the page's path under the docs (`code/csrc/sophia_kernel.cuh.md`, `code/reference.md`).
# This hook itself is `hooks/literate.py`, on the page `code/hooks/literate.md`.
def source_pages(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, str, str]]:
    found = {}
    package = root / "sophia"
    for path in sorted(package.rglob("*")):
        if path.suffix not in SOURCE_SUFFIXES or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(package).as_posix()
        name = rel[: -len(path.suffix)] if path.suffix == ".py" else rel
        found[rel] = (path, f"code/{name}.md", f"sophia/{rel}")
    hook = pathlib.Path(__file__).resolve()
    found["hooks/literate.py"] = (
        hook,
        "code/hooks/literate.md",
        hook.relative_to(root).as_posix(),
    )
    return found


@event_priority(100)
def on_files(files: Files, config) -> Files:
    root = _root(config)
    sources = source_pages(root)
    pages = {rel: page for rel, (_, page, _) in sources.items()}
    present = [name for name in NOTEBOOKS if (root / "notebooks" / name).is_file()]
    _parsed.clear()
    for rel, (path, page, repo_path) in sources.items():
        text = path.read_text(encoding="utf-8")
        language = SOURCE_SUFFIXES[path.suffix]
        try:
            lit = parse(text, language)
        except (SyntaxError, ValueError) as error:
            raise ValueError(f"literate: cannot parse {repo_path}: {error}") from error
        notebooks = [
            NOTEBOOKS[i] for i in related_notebooks(page) if NOTEBOOKS[i] in present
        ]
        url = f"{REPOSITORY}/blob/{BRANCH}/{repo_path}"
        _parsed[page] = (lit, highlight_lines(text, language))
        files.append(
            File.generated(
                config, page, content=to_markdown(lit, rel, page, url, notebooks, pages)
            )
        )
    for name in present:
        files.append(
            File(
                f"notebooks/{name}",
                str(root),
                config.site_dir,
                config.use_directory_urls,
            )
        )
    for uri, path in site_assets(root).items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


# ## KaTeX, from the site itself
#
# The math is typeset in the browser by KaTeX's auto-render (`docs/javascripts/katex.js`
# starts it). KaTeX comes from npm: `docs/npm/package.json` names it and
# `package-lock.json` pins the version and its checksum. The hook installs it with
# `npm ci` into `.cache/npm/` (ignored by git) unless that cache holds exactly the
# locked packages, and adds to the site the script, the auto-render extension, the
# stylesheet, and the fonts in `woff2` (which every browser that runs KaTeX reads; the
# stylesheet lists the older formats after it, and a browser fetches only the first
# format it supports).
#
# The same lockfile brings `iframe-worker`, the shim with which the theme's search runs
# from `file://` (browsers refuse a web worker there). The theme's `offline` plugin
# would load it from a CDN; `mkdocs.yml` names this copy instead, in `extra.polyfills`.
# So nothing is fetched from elsewhere when the site is read, and the pages work
# opened from disk.
def site_assets(root: pathlib.Path) -> dict[str, pathlib.Path]:
    manifest = root / "docs" / "npm"
    cache = root / ".cache" / "npm"
    installed = cache / "node_modules" / ".package-lock.json"
    same_lock = (cache / "package-lock.json").is_file() and filecmp.cmp(
        manifest / "package-lock.json", cache / "package-lock.json", shallow=False
    )
    if not (same_lock and installed.is_file()):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "literate: the docs install KaTeX with npm, and `npm` is not on PATH (apt-get install npm)"
            )
        cache.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(manifest / name, cache / name)
        log.info(
            "literate: installing the site's npm packages with npm ci into %s", cache
        )
        subprocess.run(
            [
                npm,
                "ci",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ],
            cwd=cache,
            check=True,
        )
    modules = cache / "node_modules"
    dist = modules / "katex" / "dist"
    out = {
        "assets/katex/katex.min.js": dist / "katex.min.js",
        "assets/katex/katex.min.css": dist / "katex.min.css",
        "assets/katex/contrib/auto-render.min.js": dist
        / "contrib"
        / "auto-render.min.js",
        "assets/iframe-worker/shim.js": modules / "iframe-worker" / "shim" / "index.js",
    }
    for font in sorted((dist / "fonts").glob("*.woff2")):
        out[f"assets/katex/fonts/{font.name}"] = font
    return out


# ## Filling in the code, and cleaning the notebooks
#
# Each empty code `div` of a literate page receives its section's lines. A notebook
# page, as `mkdocs-jupyter` renders it, loads MathJax (or an empty `src`) and, when it
# finds a diagram, Mermaid from a CDN; we take those scripts out (KaTeX renders the
# notebooks' math like every other page's, and our notebooks draw no Mermaid
# diagrams), so that the site loads nothing from elsewhere.
CODE_DIV = re.compile(r'<div class="literate-code" data-section="(\d+)"[^>]*></div>')
NOTEBOOK_SCRIPTS = [
    re.compile(r'<script[^>]*\ssrc="(?:(?:https?:)?//[^"]*)?"[^>]*>\s*</script>\s*'),
    re.compile(r'<script type="text/x-mathjax-config">.*?</script>\s*', re.S),
    re.compile(
        r'<script type="module">(?:(?!</script>).)*?cdnjs\.cloudflare\.com/ajax/libs/mermaid.*?</script>\s*',
        re.S,
    ),
]

# The notebooks open with an "Open in Colab" badge, an image that Colab serves. On the
# site the link stays and the image becomes a badge drawn by our stylesheet.
COLAB_BADGE = re.compile(
    r'<img[^>]*src="https://colab\.research\.google\.com/assets/colab-badge\.svg"[^>]*>'
)


def on_page_content(html: str, page, config, files) -> str:
    html = local_links(html, page.file.dest_uri, config.site_url or "", files)
    parsed = _parsed.get(page.file.src_uri)
    if parsed is not None:
        lit, lines = parsed
        return CODE_DIV.sub(
            lambda m: (
                f'<div class="literate-code" data-search-exclude>'
                f"{code_html(lit.sections[int(m.group(1))], lines)}</div>"
            ),
            html,
        )
    if page.file.src_uri.endswith(".ipynb"):
        for script in NOTEBOOK_SCRIPTS:
            html = script.sub("", html)
        html = COLAB_BADGE.sub('<span class="colab-badge">Open in Colab</span>', html)
    return html


# ## Two kinds of URL
#
# The pages are files, `code/reference.html`, so that the site works opened from disk.
# The published site also answers at the directory URLs, `code/reference/`, which a
# notebook opened in Colab links to: each page gets a one-line `code/reference/index.html`
# that sends the browser on to it. And a link in a page to the published site itself
# (`https://literate-sophia.github.io/sophia/code/reference/`) is rewritten into a
# relative link to the page, so that reading the site from disk stays on the disk.
SITE_LINK = '(href|src)="{}([^"#]*)(#[^"]*)?"'


def local_links(html: str, here: str, site_url: str, files) -> str:
    if not site_url:
        return html
    built = {f.dest_uri for f in files}

    def replace(match: re.Match) -> str:
        path = match.group(2)
        for target in (
            path or "index.html",
            path.rstrip("/") + ".html",
            path + "index.html",
        ):
            if target in built:
                relative = posixpath.relpath(target, posixpath.dirname(here) or ".")
                return f'{match.group(1)}="{relative}{match.group(3) or ""}"'
        return match.group(0)

    return re.sub(SITE_LINK.format(re.escape(site_url)), replace, html)


REDIRECT = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
    '<link rel="canonical" href="{target}"><meta http-equiv="refresh" content="0; url={target}">'
    '</head><body><a href="{target}">{title}</a></body></html>\n'
)


def write_redirects(site: pathlib.Path, pages: list[tuple[str, str]]) -> None:
    for dest, title in pages:
        if not dest.endswith(".html") or posixpath.basename(dest) in (
            "index.html",
            "404.html",
        ):
            continue
        stub = site / dest[: -len(".html")] / "index.html"
        if stub.exists():
            continue
        stub.parent.mkdir(parents=True, exist_ok=True)
        target = f"../{posixpath.basename(dest)}"
        stub.write_text(
            REDIRECT.format(title=html_escape(title), target=target), encoding="utf-8"
        )


_pages: list[tuple[str, str]] = []


def on_post_page(output: str, page, config) -> str:
    _pages.append((page.file.dest_uri, page.title or ""))
    return output


# ## No sitemap
#
# The sitemap lists every page with the build date, and we fixed the date: it would
# say nothing true. A site that is never stale has no use for one.
def on_post_build(config) -> None:
    write_redirects(pathlib.Path(config.site_dir), sorted(set(_pages)))
    _pages.clear()
    for name in ("sitemap.xml", "sitemap.xml.gz"):
        path = pathlib.Path(config.site_dir) / name
        if path.exists():
            path.unlink()
