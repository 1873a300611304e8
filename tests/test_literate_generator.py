r"""The literate-page generator (docs/hooks/literate.py) on the cases that break such parsers.

Each test parses a small source and checks which lines became prose, which stayed code
with which numbers, and what the page's Markdown says. The last tests run the
generator over the package's real files.
"""

import importlib.util
import pathlib
import sys
import textwrap

import markdown
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "literate_hook", ROOT / "docs" / "hooks" / "literate.py"
)
literate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = literate
_spec.loader.exec_module(literate)


def parse_py(source: str):
    return literate.parse(textwrap.dedent(source).lstrip("\n"), "python")


def parse_cpp(source: str):
    return literate.parse(textwrap.dedent(source).lstrip("\n"), "cpp")


def code_numbers(section):
    return [n for n, _ in section.code]


def test_front_matter_gives_title_summary_and_intro():
    lit = parse_py(
        '''
        r"""
        ---
        title: A title
        summary: What it is.
        ---

        # A title

        Intro with $x$.
        """
        x = 1
        '''
    )
    assert lit.meta == {"title": "A title", "summary": "What it is."}
    assert lit.intro == "# A title\n\nIntro with $x$."
    page = literate.to_markdown(
        lit, "m.py", "code/m.md", "https://example.org/m.py", [], {}
    )
    assert "title: A title" in page and "description: What it is." in page
    # The intro's heading repeats the title and is not written twice.
    assert page.count("# A title") == 1
    # The module docstring is not code.
    assert [code_numbers(s) for s in lit.sections] == [[11]]


def test_unclosed_front_matter_is_an_error_that_says_so():
    with pytest.raises(ValueError, match="never closed"):
        literate.split_front_matter("---\ntitle: x\n")


def test_blank_comment_lines_are_paragraph_breaks():
    lit = parse_py(
        """
        # First paragraph.
        #
        # Second paragraph.
        x = 1
        """
    )
    (section,) = lit.sections
    assert section.prose == ["First paragraph.", "", "Second paragraph."]
    html = markdown.markdown("\n".join(section.prose))
    assert html.count("<p>") == 2
    assert section.code == [(4, "x = 1")]


def test_a_comment_inside_a_function_opens_a_section_mid_function():
    lit = parse_py(
        """
        # The function.
        def f(x):
            y = x + 1

            # Now the second half.
            return y
        """
    )
    assert [s.prose for s in lit.sections] == [
        ["The function."],
        ["Now the second half."],
    ]
    assert lit.sections[0].code == [(2, "def f(x):"), (3, "    y = x + 1")]
    assert lit.sections[1].code == [(6, "    return y")]


def test_nested_blocks_keep_indentation_and_numbers():
    lit = parse_py(
        """
        class A:
            def f(self):
                for i in range(3):
                    if i:
                        # Deep inside: two loops and a branch.
                        #   indented continuation stays indented
                        print(i)
        """
    )
    assert lit.sections[1].prose == [
        "Deep inside: two loops and a branch.",
        "  indented continuation stays indented",
    ]
    assert lit.sections[1].code == [(7, "                print(i)")]
    assert code_numbers(lit.sections[0]) == [1, 2, 3, 4]


def test_decorators_stay_with_their_function():
    lit = parse_py(
        """
        import functools

        # A cached function.
        @functools.cache
        @staticmethod
        def f():
            return 1
        """
    )
    assert lit.sections[1].prose == ["A cached function."]
    assert code_numbers(lit.sections[1]) == [4, 5, 6, 7]


def test_strings_containing_hash_are_code():
    lit = parse_py(
        '''
        # Real prose.
        colour = "#ff0000"  # an end-of-line comment stays with its code
        text = """
        # not a comment: inside a string
        """
        '''
    )
    (section,) = lit.sections
    assert section.prose == ["Real prose."]
    assert code_numbers(section) == [2, 3, 4, 5]
    assert section.code[2] == (4, "# not a comment: inside a string")


def test_a_file_with_no_comments_is_one_section_of_code():
    lit = parse_py("x = 1\n\ny = 2\n")
    assert lit.meta == {} and lit.intro == ""
    (section,) = lit.sections
    assert section.prose == []
    assert section.code == [(1, "x = 1"), (2, ""), (3, "y = 2")]


def test_an_empty_file_has_no_sections():
    assert parse_py("").sections == []


def test_docstrings_of_functions_and_classes_join_the_prose():
    lit = parse_py(
        '''
        # A class.
        class A:
            r"""The class's docstring, with $m_t$."""

            def f(self):
                r"""Two lines
                of docstring."""
                return 1
        '''
    )
    (section,) = lit.sections
    assert section.prose == [
        "A class.",
        "",
        "The class's docstring, with $m_t$.",
        "",
        "Two lines",
        "of docstring.",
    ]
    # The docstrings' lines are not in the code column; the others keep their numbers.
    assert code_numbers(section) == [2, 4, 5, 8]


def test_math_survives_untouched():
    source = r"""
        # The EMA:
        # $$h_t = \beta_2 h_{t-k} + (1 - \beta_2)\, \hat h_t.$$
        # And a derivation:
        # \begin{align}
        #   a_1 &= b_2 \\
        #   c_* &= d_*
        # \end{align}
        x = 1
        """
    lit = parse_py(source)
    prose = "\n".join(lit.sections[0].prose)
    assert r"$$h_t = \beta_2 h_{t-k} + (1 - \beta_2)\, \hat h_t.$$" in prose
    assert "\\begin{align}\n  a_1 &= b_2 \\\\\n  c_* &= d_*\n\\end{align}" in prose
    # And Markdown keeps it exactly as written, display math inside a paragraph included.
    md = markdown.Markdown(
        extensions=["pymdownx.arithmatex", literate.DisplayMathExtension()],
        extension_configs={"pymdownx.arithmatex": {"generic": True}},
    )
    html = md.convert(prose)
    assert r"\[h_t = \beta_2 h_{t-k} + (1 - \beta_2)\, \hat h_t.\]" in html
    assert (
        "\\begin{align}\n  a_1 &amp;= b_2 \\\\\n  c_* &amp;= d_*\n\\end{align}" in html
    )
    assert "<em>" not in html and "$" not in html


def test_display_math_in_code_spans_stays_code():
    md = markdown.Markdown(
        extensions=["pymdownx.arithmatex", literate.DisplayMathExtension()]
    )
    assert "<code>$$x$$</code>" in md.convert("Write `$$x$$` for display math.")


def test_cpp_comment_blocks_and_the_opening_block_comment():
    lit = parse_cpp(
        """
        /*
        ---
        title: A kernel
        summary: One element at a time.
        ---

        Intro.
        */
        #pragma once
        #include <cstdint>

        // ## Working precision
        //
        // Done in `float32`.
        template <typename T>
        struct OpMath {
            // Inside a struct.
            using type = float;  // end-of-line comment stays
        };
        const char* url = "http://example.org // not a comment";
        """
    )
    assert lit.meta["title"] == "A kernel" and lit.intro == "Intro."
    assert [s.prose for s in lit.sections] == [
        [],
        ["## Working precision", "", "Done in `float32`."],
        ["Inside a struct."],
    ]
    # Preprocessor lines are code, not prose.
    assert code_numbers(lit.sections[0]) == [9, 10]
    assert code_numbers(lit.sections[1]) == [15, 16]
    assert code_numbers(lit.sections[2]) == [18, 19, 20]
    assert lit.sections[2].code[2][1].startswith('const char* url = "http://')


def test_links_to_module_pages_are_resolved():
    pages = {
        "reference.py": "code/reference.md",
        "foreach.py": "code/foreach.md",
        "csrc/sophia_launcher.cu": "code/csrc/sophia_launcher.cu.md",
        "csrc/sophia_launcher.h": "code/csrc/sophia_launcher.h.md",
    }
    text = "[a](foreach.html), [b](csrc/sophia_launcher.html#x), [c](https://x.org/a.html), [d](../scale.md)"
    out = literate.resolve_links(text, "reference.py", "code/reference.md", pages)
    assert (
        out
        == "[a](foreach.md), [b](csrc/sophia_launcher.cu.md#x), [c](https://x.org/a.html), [d](../scale.md)"
    )
    out = literate.resolve_links(
        "[r](../reference.html)",
        "csrc/sophia_kernel.cuh",
        "code/csrc/sophia_kernel.cuh.md",
        pages,
    )
    assert out == "[r](../reference.md)"


def test_unresolved_links_are_reported(caplog):
    out = literate.resolve_links(
        "[x](nowhere.html)", "reference.py", "code/reference.md", {}
    )
    assert out == "[x](nowhere.html)"
    assert "nowhere.html" in caplog.text


def test_highlighted_lines_match_the_file():
    source = 'x = """\n# a\n"""\n\ny = 1  # c\n'
    lines = literate.highlight_lines(source, "python")
    assert len(lines) >= 5
    import html
    import re

    text = [html.unescape(re.sub(r"<[^>]+>", "", line)) for line in lines[:5]]
    assert text == source.splitlines()


@pytest.mark.parametrize("rel", sorted(literate.source_pages(ROOT)), ids=lambda r: r)
def test_every_source_file_parses_and_every_code_line_is_shown_once(rel):
    path, page, _ = literate.source_pages(ROOT)[rel]
    source = path.read_text()
    language = literate.SOURCE_SUFFIXES[path.suffix]
    lit = literate.parse(source, language)
    lines = source.splitlines()
    shown = [n for s in lit.sections for n, _ in s.code]
    assert shown == sorted(set(shown))
    for section in lit.sections:
        for n, line in section.code:
            assert line == lines[n - 1]
    # Every non-blank line is on the page: as code, as prose, or in a docstring.
    prose_lines = literate.comment_lines(source, language)
    if language == "python":
        docstring_lines = literate.python_docstrings(source)[1]
    else:
        docstring_lines = literate.cpp_docstring(source)[1]
    for n, line in enumerate(lines, start=1):
        if line.strip():
            assert (n in shown) + (n in prose_lines) + (n in docstring_lines) == 1, (
                f"{rel}:{n} {line!r}"
            )
    if path.name != "__main__.py":
        assert lit.meta.get("title"), f"{rel} has no title in its front matter"


def test_links_to_the_published_site_become_links_within_it():
    class F:
        def __init__(self, dest_uri):
            self.dest_uri = dest_uri

    files = [
        F("index.html"),
        F("code/reference.html"),
        F("notebooks/02_hessian_estimators.html"),
    ]
    site = "https://literate-sophia.github.io/sophia/"
    html = (
        f'<a href="{site}code/reference/">r</a> <a href="{site}code/reference.html#the-step">s</a> '
        f'<a href="{site}">home</a> <a href="{site}nowhere/">n</a> <a href="https://example.org/code/reference/">e</a>'
    )
    out = literate.local_links(html, "notebooks/01_toy_quadratics.html", site, files)
    assert out == (
        '<a href="../code/reference.html">r</a> <a href="../code/reference.html#the-step">s</a> '
        f'<a href="../index.html">home</a> <a href="{site}nowhere/">n</a> <a href="https://example.org/code/reference/">e</a>'
    )


def test_each_page_is_also_reachable_at_its_directory_url(tmp_path):
    literate.write_redirects(
        tmp_path, [("code/reference.html", "The <reference>"), ("index.html", "Home")]
    )
    stub = (tmp_path / "code" / "reference" / "index.html").read_text()
    assert (
        'content="0; url=../reference.html"' in stub and "The &lt;reference&gt;" in stub
    )
    assert not (tmp_path / "index" / "index.html").exists()


# ## Titles, permalinks, and the math hook (docs/hooks/rendering.py)


def test_the_docstrings_heading_is_the_title_or_dropped_and_paths_are_escaped():
    headed = parse_py('r"""\n# The heading\n\nProse.\n"""\nx = 1\n')
    page = literate.to_markdown(headed, "m.py", "code/m.md", "https://e.org/m", [], {})
    assert "title: The heading" in page and page.count("# The heading") == 1
    titled = parse_py('r"""\n---\ntitle: Front\n---\n# Other\n\nProse.\n"""\nx = 1\n')
    page = literate.to_markdown(titled, "m.py", "code/m.md", "https://e.org/m", [], {})
    assert "# Front\n" in page and "Other" not in page
    bare = parse_py("x = 1\n")
    page = literate.to_markdown(
        bare, "__main__.py", "code/__main__.md", "https://e.org/m", [], {}
    )
    assert "# \\_\\_main\\_\\_.py\n" in page and "title: __main__.py" in page
    html = markdown.markdown(page.split("---\n", 2)[2])
    assert "<h1>__main__.py</h1>" in html


def test_each_section_has_an_anchor_at_its_first_line_and_the_code_is_not_indexed():
    lit = parse_py("x = 1\n\n# Why y.\ny = 2\n")
    page = literate.to_markdown(lit, "m.py", "code/m.md", "https://e.org/m", [], {})
    assert 'id="L1"' in page and 'id="L3"' in page and 'href="#L3"' in page
    filled = literate.CODE_DIV.sub("<x>", page)
    assert filled.count("<x>") == 2
    # No headings in the prose: no table of contents, whose column would be empty.
    assert "- toc" in page


_rspec = importlib.util.spec_from_file_location(
    "rendering_hook", ROOT / "docs" / "hooks" / "rendering.py"
)
rendering = importlib.util.module_from_spec(_rspec)
_rspec.loader.exec_module(rendering)


@pytest.fixture
def katex():
    from conftest import require

    installed = (ROOT / ".cache" / "npm" / "node_modules" / "katex").is_dir()
    require(
        installed and rendering.shutil.which("node") is not None,
        "typesetting needs node and KaTeX (apt-get install nodejs; mkdocs build)",
    )
    rendering._katex = rendering.KaTeX(ROOT)
    yield rendering._katex
    rendering._katex.close()
    rendering._katex = None


def test_a_formula_katex_cannot_parse_is_reported_with_its_file_and_line(
    katex, tmp_path, caplog
):
    (tmp_path / "mkdocs.yml").write_text("site_name: x\n")
    (tmp_path / "m.py").write_text("x = 1\n# Fine: $a_{b}$.\n# Broken: $\\frac{a$.\n")

    class Config:
        config_file_path = str(tmp_path / "mkdocs.yml")

    class Page:
        meta = {"source": "m.py"}
        file = type("F", (), {"src_uri": "code/m.md", "abs_src_path": None})

    html = (
        '<p>Fine: <span class="arithmatex">\\(a_{b}\\)</span>. Broken: '
        '<span class="arithmatex">\\(\\frac{a\\)</span>.</p>'
    )
    with caplog.at_level("WARNING"):
        out = rendering.typeset(html, Page, Config)
    assert out.count('class="katex"') == 1 and 'class="katex-error"' in out
    assert "m.py:3: KaTeX cannot parse $\\frac{a$" in caplog.text
    # A display formula is typeset in display mode, with MathML for screen readers.
    shown = rendering.typeset('<span class="arithmatex">\\[x\\]</span>', Page, Config)
    assert "katex-display" in shown and "<math" in shown


def test_a_plots_alt_text_is_its_figures_title():
    source = 'fig.suptitle("Loss by step")\nax.set(title=f"{name}: paths")\n'
    assert rendering.figure_titles(source) == "Loss by step; …: paths"
    html = f"<img {rendering.NO_DESCRIPTION}><img {rendering.NO_DESCRIPTION}>"
    out = rendering.describe_plots(html, ["One", "Two <b>"])
    assert 'alt="One"' in out and 'alt="Two &lt;b&gt;"' in out
