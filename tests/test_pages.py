"""The side-by-side pages (docs/build.py): how a script is cut into sections and formulas set aside, checked without
a browser; then the built site in headless Chromium, as a reader meets it: every page loads clean, every formula is
typeset, every tag link lands on a line that cites the tag, every tag a section cites is explained beside it, and the
pages fit a desktop and a phone.

The build needs docs/requirements.txt and `npm ci --prefix docs`, the browser tests Debian's chromium; .ci/run installs
all three. Where one is missing these tests are skipped, except under CI, where that is a failure."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import build  # noqa: E402

WIDTHS = {"desktop": (1440, 900), "phone": (390, 844)}


def need(present: bool, what: str) -> None:
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; .ci/run installs it")
        pytest.skip(f"{what} is not installed (see docs/requirements.txt)")


# ---- without a browser ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", build.SCRIPTS)
def test_sections_cover_every_line_once_and_cut_at_each_definition_and_phase(name):
    source = (ROOT / f"{name}.py").read_text()
    parts = build.sections(source)
    covered = [n for s in parts for n in range(s.start, s.end + 1)]
    assert covered == list(range(1, len(source.splitlines()) + 1))
    anchors = [s.anchor for s in parts]
    assert len(set(anchors)) == len(anchors)
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert node.name in anchors, f"{name}.py: {node.name} has no section of its own"
    phases = re.findall(r"^\s+# -{3,} (\d+)\.", source, re.M)
    assert [a for a in anchors if a.startswith("phase-")] == [f"phase-{p}" for p in phases]
    if name != "common":
        assert len(phases) >= 4, f"{name}.py: main() should be cut into numbered phases"
    assert parts[0].anchor == "objective" and (parts[0].tags or name == "common")  # the objective, with its tags


def test_a_section_holds_its_decorators_and_the_comments_above_it():
    source = "'''doc'''\nimport x\n\n# why\n@decorator\ndef f():\n    pass\n"
    parts = build.sections(source)
    assert [(s.anchor, s.start, s.end) for s in parts] == [("objective", 1, 1), ("imports", 2, 3), ("f", 4, 7)]


def test_formulas_are_set_aside_and_code_spans_keep_their_dollars():
    math = build.Math()
    text = math.protect("cost `$HOME` and $x_1$, then\n$$\n\\frac{a}{b}\n$$\nand `$` again")
    assert math.formulas == [("x_1", False), ("\\frac{a}{b}", True)]
    assert "`$HOME`" in text and "`$` again" in text and "MATHPH0X" in text and "\n\nMATHPH1X\n\n" in text


def test_tags_link_in_text_but_not_inside_attributes():
    html = build.link_tags('<a title="[GRPO-ADV]">see [GRPO-ADV] and [REINFORCE++]</a> [unknown]')
    assert html.count('href="equations.html#GRPO-ADV"') == 1
    assert 'href="equations.html#REINFORCEpp" data-tag="REINFORCE++"' in html
    assert 'title="[GRPO-ADV]"' in html and "[unknown]" in html


def test_the_catalogue_parses_into_one_entry_per_tag_heading():
    text = (ROOT / "docs" / "equations.md").read_text()
    entries, blocks = build.catalogue(text)
    assert list(entries) == re.findall(r"^### \[([^\]]+)\]", text, re.M)
    assert [v for k, v in blocks if k == "entry"] == list(entries)
    assert all(e.body and "$$" in e.body for e in entries.values())  # each has its formula


def test_a_build_without_katex_or_with_a_bad_out_fails_in_one_line(tmp_path, capsys):
    with pytest.raises(build.BuildError, match="npm ci --prefix docs"):
        build.Math().render_all(tmp_path / "node_modules")
    (tmp_path / "file").write_text("x")
    assert build.main(["--out", str(tmp_path / "file")]) == 2
    assert build.main(["--out", str(ROOT)]) == 2
    with pytest.raises(SystemExit) as stop:
        build.main(["--outt", "x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert (tmp_path / "file").read_text() == "x"


# ---- the built site ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    need(all(importlib.util.find_spec(m) for m in ("markdown", "pygments")), "markdown or pygments")
    need((ROOT / "docs" / "node_modules" / "katex").is_dir() and shutil.which("node") is not None,
         "KaTeX (npm ci --prefix docs) or node")
    out = tmp_path_factory.mktemp("site") / "site"
    counts = build.build(out)
    assert counts["pages"] == len(list(out.glob("*.html")))
    return out


def test_the_site_has_every_page_and_loads_nothing_from_the_network(site):
    names = {p.name for p in site.glob("*.html")}
    assert {"index.html", "equations.html", *(f"{s}.html" for s in build.SCRIPTS)} <= names
    assert {f"diff-{a}-{b}.html" for a, b in build.sibling_pairs()} <= names
    for page in site.glob("*.html"):
        text = page.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//(?!arxiv\.org)""", text.replace("https://arxiv.org", ""))
        assert "<script" not in text and "MATHPH" not in text
        for ref in re.findall(r'(?:src|href)="([^"#:]+)(?:#[^"]*)?"', text):
            assert (site / ref).exists(), f"{page.name} refers to {ref}, which the build did not write"


@pytest.fixture(scope="module")
def browser():
    need(importlib.util.find_spec("playwright") is not None, "playwright")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    need(chromium is not None, "chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
    page.goto(url)
    page.wait_for_load_state("load")
    page.evaluate("document.fonts.ready.then(() => true)")
    return page, problems


RAW_TEX = r"""() => {
  const root = document.querySelector('main').cloneNode(true);
  root.querySelectorAll('.katex, code, pre').forEach(e => e.remove());
  return root.textContent.match(/\$|\\(frac|operatorname|mathbb|mathcal|text|sum|log|pi|theta|hat)\b/g) || [];
}"""


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_loads_clean_typesets_every_formula_and_fits_the_screen(site, browser, width):
    for file in sorted(site.glob("*.html")):
        page, problems = open_page(browser, file.as_uri(), *WIDTHS[width])
        assert not problems, f"{file.name}: {problems}"
        expected = int(page.evaluate("document.body.dataset.formulas"))
        typeset = page.evaluate("document.querySelectorAll('.katex').length")
        assert typeset == expected, f"{file.name}: {typeset} of {expected} formulas typeset"
        assert page.evaluate("document.querySelectorAll('.katex-error').length") == 0, file.name
        assert page.evaluate(RAW_TEX) == [], f"{file.name}: raw TeX outside the formulas"
        if expected:  # KaTeX's own fonts, from the site's assets, are what the formulas are drawn in
            assert page.evaluate("document.fonts.check('16px KaTeX_Main')"), file.name
            assert "KaTeX_Main" in page.evaluate("getComputedStyle(document.querySelector('.katex')).fontFamily")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{file.name} at {width} width scrolls sideways by {overflow} px"
        if width == "desktop" and file.stem in build.SCRIPTS:  # every line of code fits its column, no sideways scroll
            wide = page.evaluate("[...document.querySelectorAll('pre.code')].filter(e => e.scrollWidth > "
                                 "e.clientWidth).map(e => e.parentElement.id)")
            assert wide == [], f"{file.name}: sections whose code scrolls sideways at 1440 px: {wide}"
        page.close()


def test_every_tag_link_of_the_catalogue_lands_on_a_line_that_cites_the_tag(site, browser):
    page, problems = open_page(browser, (site / "equations.html").as_uri(), 1440, 900)
    links = page.evaluate("[...document.querySelectorAll('a.cite')].map(a => [a.getAttribute('href'), "
                          "a.dataset.tag])")
    entries = page.evaluate("[...document.querySelectorAll('section.entry')].map(e => [e.id, e.dataset.entry])")
    page.close()
    assert not problems and links
    by_page = {}
    for href, tag in links:
        file, line = href.split("#")
        by_page.setdefault(file, []).append((line, tag))
    for file, targets in by_page.items():
        page, _ = open_page(browser, (site / file).as_uri(), 1440, 900)
        texts = page.evaluate("ids => ids.map(id => (document.getElementById(id) || {}).textContent || null)",
                              [line for line, _ in targets])
        for (line, tag), text in zip(targets, texts):
            assert text is not None and f"[{tag}]" in text, f"{file}#{line} should cite [{tag}]: {text!r}"
        page.close()
    cited = {tag for _, tag in links}  # and every tag a script cites is linked from its entry to that line
    for name in build.SCRIPTS:
        for n, line in enumerate((ROOT / f"{name}.py").read_text().splitlines(), 1):
            for tag in build.TAG.findall(line):
                if tag in dict(map(reversed, entries)):
                    assert [f"{name}.html#L{n}", tag] in links
                    assert tag in cited
    # and every tag link in the code lands on its entry
    for name in build.SCRIPTS:
        page, _ = open_page(browser, (site / f"{name}.html").as_uri(), 1440, 900)
        hrefs = set(page.evaluate("[...document.querySelectorAll('pre.code a.tag')].map(a => a.getAttribute('href'))"))
        page.close()
        assert (hrefs or name == "common") and hrefs <= {f"equations.html#{i}" for i, _ in entries}, name


@pytest.mark.parametrize("name", build.SCRIPTS)
def test_every_tag_a_section_cites_is_explained_beside_its_code(site, browser, name):
    page, problems = open_page(browser, (site / f"{name}.html").as_uri(), 1440, 900)
    rows = page.evaluate("""[...document.querySelectorAll('section.pair')].map(s => {
        const notes = s.querySelector('.notes'), code = s.querySelector('pre.code');
        const n = notes.getBoundingClientRect(), c = code.getBoundingClientRect();
        return {id: s.id,
                cited: [...code.querySelectorAll('a.tag')].map(a => a.dataset.tag),
                beside: [...notes.querySelectorAll('.entry')].map(e => e.dataset.entry),
                formulas: [...notes.querySelectorAll('.entry')].map(e => e.querySelectorAll('.katex').length),
                sideBySide: n.right <= c.left + 1 && Math.abs(n.top - c.top) < 2};
    })""")
    page.close()
    assert not problems
    source_tags = set(build.TAG.findall((ROOT / f"{name}.py").read_text())) & set(build.catalogue(
        (ROOT / "docs" / "equations.md").read_text())[0])
    assert {t for r in rows for t in r["cited"]} == source_tags
    for r in rows:
        assert set(r["cited"]) <= set(r["beside"]), f"{name}.html#{r['id']}: {r}"
        assert all(r["formulas"]), f"{name}.html#{r['id']}: an entry beside the code has no typeset formula"
        assert r["sideBySide"], f"{name}.html#{r['id']}: the notes are not beside the code"
