"""The side-by-side pages: every algorithm script in two columns, its code on the right in sections (the docstring,
each function, each numbered phase of main()), and on the left, beside each section, the catalogue entries
(docs/equations.md) of the tags that section cites, formulas rendered as math. Also the catalogue itself, every tag
linked to each line that cites it, an index with the "How the scripts differ" table, and side-by-side diffs of
sibling scripts.

    pip install -r docs/requirements.txt && npm ci --prefix docs     # once: markdown, pygments; KaTeX
    python docs/build.py --out site                                   # a second or two
    xdg-open site/index.html                                          # (macOS: open) no server, no network

Math is rendered here, at build time, by KaTeX under node; its stylesheet and fonts are copied into the output, so the
pages load nothing from the network and run no script.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import html
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCRIPTS = ["sft", "reward", "reinforce", "ppo", "trpo", "grpo", "grpo_iterative", "gspo", "dpo", "rft", "common"]
SIBLINGS = [("grpo", "gspo"), ("grpo", "grpo_iterative"), ("reinforce", "grpo"), ("reinforce", "ppo"), ("ppo", "trpo"),
            ("sft", "rft"), ("reinforce", "rft"), ("dpo", "reward")]
TAG = re.compile(r"\[([A-Z][A-Z0-9]*(?:[-+][A-Z0-9]*)*\+*)\]")  # [GRPO-ADV], [REINFORCE++]


class BuildError(Exception):
    """A fault the builder reports in one line."""


def slug(tag: str) -> str:
    return tag.replace("+", "p")


# ---- the catalogue: docs/equations.md split into its entries, one per "### [TAG] title" heading ------------------

@dataclass
class Entry:
    tag: str
    title: str
    body: str  # markdown, up to the next ### or ## heading (#### sub-headings stay in it)


def catalogue(text: str) -> tuple[dict[str, Entry], list[tuple[str, str]]]:
    """The entries by tag, and the page as (kind, markdown) blocks in order: ("md", text) or ("entry", tag)."""
    entries, blocks, current = {}, [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"### \[([^\]]+)\] (.*)", lines[i])
        if not m:
            current.append(lines[i])
            i += 1
            continue
        blocks.append(("md", "\n".join(current)))
        current = []
        j = i + 1
        while j < len(lines) and not re.match(r"#{2,3} ", lines[j]):
            j += 1
        entries[m[1]] = Entry(m[1], m[2], "\n".join(lines[i + 1:j]).strip())
        blocks.append(("entry", m[1]))
        i = j
    blocks.append(("md", "\n".join(current)))
    return entries, blocks


# ---- markdown with math: formulas set aside, the markdown rendered, then each formula put back as KaTeX's HTML ------

class Math:
    """Collects every formula of the build, renders them all in one node call, and fills them in."""

    def __init__(self):
        self.formulas: list[tuple[str, bool]] = []

    def protect(self, text: str) -> str:
        """Replace $$...$$ and $...$ outside code spans by placeholders markdown leaves alone."""
        out, pos = [], 0
        for m in re.finditer(r"(`+)(?:.|\n)*?\1|\$\$((?:.|\n)+?)\$\$|\$((?:[^$\n]|\n(?!\n))+?)\$", text):
            out.append(text[pos:m.start()])
            if m[1]:  # a code span: its dollars are code
                out.append(m[0])
            else:
                display = m[2] is not None
                self.formulas.append(((m[2] if display else m[3]).strip(), display))
                ph = f"MATHPH{len(self.formulas) - 1}X"
                out.append(f"\n\n{ph}\n\n" if display else ph)
            pos = m.end()
        out.append(text[pos:])
        return "".join(out)

    def render_all(self, node_modules: Path) -> list[str]:
        script = ("const katex = require('katex'); let s = ''; process.stdin.on('data', d => s += d);"
                  "process.stdin.on('end', () => { const out = []; for (const [tex, display] of JSON.parse(s)) {"
                  "try { out.push(katex.renderToString(tex, {displayMode: display, throwOnError: true,"
                  " output: 'htmlAndMathml'})); } catch (e) { console.error(tex + ' :: ' + e.message);"
                  " process.exit(3); } } process.stdout.write(JSON.stringify(out)); });")
        if not (node_modules / "katex").is_dir():
            raise BuildError(f"KaTeX is not installed in {node_modules}: run npm ci --prefix docs")
        if shutil.which("node") is None:
            raise BuildError("node is not on PATH: KaTeX renders the formulas under node (install nodejs)")
        done = subprocess.run(["node", "-e", script], input=json.dumps(self.formulas), capture_output=True, text=True,
                              env={"NODE_PATH": str(node_modules), "PATH": "/usr/bin:/bin:/usr/local/bin"})
        if done.returncode:
            raise BuildError(f"KaTeX could not render a formula of docs/equations.md: {done.stderr.strip()[:300]}")
        return json.loads(done.stdout)


def markdown_html(text: str, math: Math) -> str:
    import markdown
    return link_tags(markdown.markdown(math.protect(text), extensions=["tables", "fenced_code"]))


def link_tags(fragment: str, known: set[str] | None = None) -> str:
    """[TAG] in text (not inside a tag's attributes) becomes a link to its catalogue entry."""
    def sub(m):
        tag = m[2]
        if known is not None and tag not in known:
            return m[0]
        return f'<a class="tag" href="equations.html#{slug(tag)}" data-tag="{tag}">[{tag}]</a>'
    return re.sub(r"(<[^>]*>)|" + TAG.pattern, lambda m: m[1] or sub(m), fragment)


def link_functions(fragment: str) -> str:
    """`grpo.py:group_advantages` in a code span links to the function on its page."""
    def sub(m):
        script, name = m[1], m[2]
        if script not in SCRIPTS:
            return m[0]
        target = f"{script}.html" + (f"#{name}" if name else "")
        return f'<a href="{target}"><code>{m[0][6:-7]}</code></a>'
    return re.sub(r"<code>(\w+)\.py(?::(\w+))?</code>", sub, fragment)


# ---- a script in sections: the docstring, the imports, each top-level definition, each "# ---- N." phase of main -----

@dataclass
class Section:
    title: str
    anchor: str
    start: int  # first line, 1-based
    end: int    # last line, inclusive
    tags: list[str] = field(default_factory=list)


def sections(source: str) -> list[Section]:
    """Cut the file at top-level definitions and at banner comments (`# ---- ...`, any indent); every line lands in
    exactly one section, in order. A definition's decorators and the comments just above it go with it."""
    lines = source.splitlines()
    tree = ast.parse(source)
    cuts: dict[int, tuple[str, str]] = {}
    doc = ast.get_docstring(tree, clean=False)
    body = tree.body[1:] if doc is not None else tree.body
    if doc is not None:
        cuts[1] = ("The objective", "objective")
    if body:
        first = body[0]
        cuts.setdefault(first.lineno, ("Imports", "imports"))
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            while start > 1 and lines[start - 2].startswith("#") and not lines[start - 2].startswith("# ----"):
                start -= 1
            kind = "class" if isinstance(node, ast.ClassDef) else "def"
            cuts[start] = (f"{kind} {node.name}", node.name)
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            cuts[node.lineno] = ("Entry point", "entry-point")
    for n, line in enumerate(lines, 1):
        m = re.match(r"\s*# -{3,} (.*?)\s*-*$", line)
        if m:
            title = m[1].rstrip(" -")
            phase = re.match(r"(\d+)\.", title)
            cuts[n] = (title[0].upper() + title[1:], f"phase-{phase[1]}" if phase else f"s{n}")
    starts = sorted(cuts)
    if not starts or starts[0] != 1:
        starts.insert(0, 1)
        cuts[1] = ("Top", "top")
    out = []
    for k, start in enumerate(starts):
        end = starts[k + 1] - 1 if k + 1 < len(starts) else len(lines)
        title, anchor = cuts[start]
        text = "\n".join(lines[start - 1:end])
        out.append(Section(title, anchor, start, end, list(dict.fromkeys(TAG.findall(text)))))
    return out


def highlighted(source: str) -> list[str]:
    """One HTML string per source line, each self-contained (pygments closes its spans at every line break)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    lines = highlight(source, PythonLexer(), HtmlFormatter(nowrap=True)).split("\n")
    return lines[:len(source.splitlines())]


# ---- the pages -------------------------------------------------------------------------------------------------------

def page(title: str, body: str, nav: str, formulas: int = 0) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)}</title><link rel="stylesheet" href="assets/katex/katex.min.css">'
            f'<link rel="stylesheet" href="assets/pygments.css"><link rel="stylesheet" href="assets/site.css">'
            f'</head><body data-formulas="{formulas}">{nav}<main>{body}</main></body></html>\n')


def navigation(current: str) -> str:
    links = [f'<a href="index.html"{" class=here" if current == "index" else ""}>Index</a>',
             f'<a href="equations.html"{" class=here" if current == "equations" else ""}>Equations</a>']
    links += [f'<a href="{s}.html"{" class=here" if s == current else ""}>{s}.py</a>' for s in SCRIPTS]
    return f'<nav>{"".join(links)}</nav>'


def code_rows(name: str, hl: list[str], start: int, end: int, known: set[str]) -> str:
    rows = []
    for n in range(start, end + 1):
        rows.append(f'<span class="line" id="L{n}"><a class="ln" href="#L{n}">{n}</a>'
                    f'{link_tags(hl[n - 1], known) or " "}</span>')
    return f'<pre class="code highlight">{"".join(rows)}</pre>'


def entry_html(entry: Entry, math: Math, full_at: tuple[str, str] | None = None) -> str:
    """An entry: its heading and body; or, where full_at names the section that shows it in full (anchor, title),
    the formula alone and a link there."""
    body = entry.body
    if full_at:
        m = re.search(r"\$\$(?:.|\n)+?\$\$", body)
        body = m[0] if m else ""
    head = f'<h3 class="entry-title"><a href="equations.html#{slug(entry.tag)}">[{entry.tag}]</a> ' \
           f'{html.escape(entry.title)}</h3>'
    more = f'<p class="more">In full beside <a href="#{full_at[0]}">{html.escape(full_at[1])}</a>.</p>' if full_at \
        else ""
    return f'<div class="entry" data-entry="{entry.tag}">{head}{markdown_html(body, math)}{more}</div>'


def home(entry: Entry, name: str, parts: list[Section]) -> Section:
    """The section that shows an entry in full: the function its "Code." line names in this script, else the first
    function, then the first phase of main(), then any section, that cites it; the objective last."""
    code = re.search(r"\*\*Code\.\*\*(.*)", entry.body)
    named = re.findall(rf"`{name}\.py:(\w+)`", code[1] if code else "")
    citing = [s for s in parts if entry.tag in s.tags]
    ranked = ([s for f in named for s in citing if s.anchor == f or f == "main" and s.anchor.startswith("phase")]
              + [s for s in citing if s.title.startswith("def ")] + [s for s in citing if s.anchor.startswith("phase")]
              + [s for s in citing if s.anchor != "objective"] + citing)
    return ranked[0]


def script_page(name: str, entries: dict[str, Entry], math: Math) -> tuple[str, dict[str, list[int]]]:
    """The two-column page of one script, and the lines citing each tag. Each cited entry is shown in full once,
    beside the first section that computes it (the objective only states it), and by its formula elsewhere."""
    source = (ROOT / f"{name}.py").read_text()
    hl, known, rows, parts = highlighted(source), set(entries), [], sections(source)
    citing: dict[str, list[int]] = {}
    for n, line in enumerate(source.splitlines(), 1):
        for tag in dict.fromkeys(TAG.findall(line)):
            if tag in known:
                citing.setdefault(tag, []).append(n)
    full = {tag: home(entries[tag], name, parts) for sec in parts for tag in sec.tags if tag in known}
    for sec in parts:
        notes = [entry_html(entries[tag], math, None if full[tag] is sec else (full[tag].anchor, full[tag].title))
                 for tag in sec.tags if tag in known]
        if sec.anchor == "objective":
            notes.insert(0, f"<p class=lead>The objective of <code>{name}.py</code> in its own words; below, each "
                            f"function and each phase of <code>main()</code> beside the entries it computes.</p>")
        title = link_tags(html.escape(sec.title), known)
        rows.append(f'<section class="pair" id="{sec.anchor}"><div class="notes"><h2><a class="self" '
                    f'href="#{sec.anchor}">§</a> {title}</h2>{"".join(notes)}</div>'
                    f'{code_rows(name, hl, sec.start, sec.end, known)}</section>')
    body = f'<h1><code>{name}.py</code> beside its derivations</h1>' + "".join(rows)
    return page(f"{name}.py", body, navigation(name)), citing


def catalogue_page(blocks, entries: dict[str, Entry], citing: dict[str, dict[str, list[int]]], math: Math) -> str:
    parts = []
    for kind, value in blocks:
        if kind == "md":
            parts.append(markdown_html(value, math))
            continue
        entry = entries[value]
        cites = [f'<a class="cite" href="{s}.html#L{n}" data-tag="{value}">{s}.py:{n}</a>'
                 for s in SCRIPTS for n in citing[s].get(value, [])]
        where = f'<p class="cited">Cited at {", ".join(cites)}</p>' if cites else '<p class="cited">Cited by no ' \
                                                                                 'script line.</p>'
        parts.append(f'<section class="entry" id="{slug(value)}" data-entry="{value}"><h3>'
                     f'<a href="#{slug(value)}">[{value}]</a> {html.escape(entry.title)}</h3>{where}'
                     f'{markdown_html(entry.body, math)}</section>')
    return page("Equation catalogue", f'<div class="prose">{"".join(parts)}</div>', navigation("equations"))


def sibling_pairs() -> list[tuple[str, str]]:
    """SIBLINGS, then each script with its nearest sibling from the README's table, each pair once."""
    rows = re.findall(r"^\| `(\w+)\.py` \| \d+ \| `(\w+)\.py` \|", (ROOT / "README.md").read_text(), re.M)
    pairs = list(SIBLINGS)
    for a, b in rows:
        if (a, b) not in pairs and (b, a) not in pairs:
            pairs.append((a, b))
    return pairs


def objective(name: str) -> str:
    doc = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text())) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def index_page(math: Math, pairs: list[tuple[str, str]]) -> str:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"### How the scripts differ\n(.*?)(?=\n#{1,3} )", readme, re.S)
    table = m[1] if m else ""
    table_html = markdown_html(table, math)

    def diff_link(m):  # each row's script and sibling link to their side-by-side diff
        pair = next((p for p in [(m[1], m[2]), (m[2], m[1])] if p in pairs), None)
        return m[0] + (f' (<a href="diff-{pair[0]}-{pair[1]}.html">side by side</a>)' if pair else "")
    table_html = re.sub(r"<code>(\w+)\.py</code></td>\s*<td>\d+</td>\s*<td><code>(\w+)\.py</code>", diff_link,
                        table_html)
    items = "".join(f'<li><a href="{s}.html"><code>{s}.py</code></a>: {html.escape(objective(s))}</li>'
                    for s in SCRIPTS)
    diffs = "".join(f'<li><a href="diff-{a}-{b}.html"><code>{a}.py</code> and <code>{b}.py</code></a></li>'
                    for a, b in pairs)
    body = (f'<div class="prose"><h1>Post-training algorithms, each beside its derivations</h1>'
            f'<p>Each page shows one script: its code on the right, and on the left, beside each section, the entries '
            f'of the <a href="equations.html">equation catalogue</a> for the tags that section cites.</p>'
            f'<h2>The scripts</h2><ul>{items}</ul><h2>Side by side: sibling scripts</h2><ul>{diffs}</ul>'
            f'{table_html}</div>')
    return page("Post-training algorithms", body, navigation("index"))


def diff_page(a: str, b: str) -> str:
    """Two scripts in two columns, aligned by difflib; runs of identical lines folded to three lines of context."""
    sa, sb = ((ROOT / f"{s}.py").read_text() for s in (a, b))
    la, lb, ha, hb = sa.splitlines(), sb.splitlines(), highlighted(sa), highlighted(sb)
    rows, same = [], 0

    def cell(name, hl, n, kind):
        if n is None:
            return '<td class="num"></td><td class="empty"></td>'
        return f'<td class="num"><a href="{name}.html#L{n + 1}">{n + 1}</a></td><td class="{kind}"><pre>' \
               f'{hl[n] or " "}</pre></td>'
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, la, lb, autojunk=False).get_opcodes():
        if op == "equal":
            same += i2 - i1
            keep = list(range(i2 - i1))
            if i2 - i1 > 8:
                keep = keep[:3] + [None] + keep[-3:]
            for k in keep:
                if k is None:
                    rows.append(f'<tr class="fold"><td colspan="4">{i2 - i1 - 6} identical lines</td></tr>')
                else:
                    rows.append(f"<tr>{cell(a, ha, i1 + k, 'same')}{cell(b, hb, j1 + k, 'same')}</tr>")
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            left = i1 + k if i1 + k < i2 else None
            right = j1 + k if j1 + k < j2 else None
            rows.append(f"<tr>{cell(a, ha, left, 'del')}{cell(b, hb, right, 'add')}</tr>")
    head = (f'<div class="head"><h1><code>{a}.py</code> and <code>{b}.py</code> side by side</h1><p class="lead">'
            f'{same} lines the same (runs of more than eight folded); {len(la) - same} only in <a href="{a}.html">{a}.py'
            f'</a> (left, red), {len(lb) - same} only in <a href="{b}.html">{b}.py</a> (right, green).</p></div>')
    return page(f"{a}.py and {b}.py", f'{head}<table class="diff highlight"><colgroup><col class="num"><col><col class="num"><col>'
                f'</colgroup>{"".join(rows)}</table>',
                navigation(""))


def build(out: Path, node_modules: Path = DOCS / "node_modules") -> dict[str, int]:
    for module in ("markdown", "pygments"):
        if importlib.util.find_spec(module) is None:
            raise BuildError(f"{module} is not installed: pip install -r docs/requirements.txt")
    entries, blocks = catalogue((DOCS / "equations.md").read_text())
    math = Math()
    pages, citing = {}, {}
    for name in SCRIPTS:
        pages[f"{name}.html"], citing[name] = script_page(name, entries, math)
    pages["equations.html"] = catalogue_page(blocks, entries, citing, math)
    pairs = sibling_pairs()
    pages["index.html"] = index_page(math, pairs)
    for a, b in pairs:
        pages[f"diff-{a}-{b}.html"] = diff_page(a, b)
    rendered = math.render_all(node_modules)
    tmp = out.with_name(out.name + ".tmp")  # written whole, then moved: a failed build leaves no half site
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "assets").mkdir(parents=True)
    for file, text in pages.items():
        used = set(map(int, re.findall(r"MATHPH(\d+)X", text)))
        text = re.sub(r"<p>MATHPH(\d+)X</p>|MATHPH(\d+)X", lambda m: rendered[int(m[1] or m[2])], text)
        text = text.replace(' data-formulas="0"', f' data-formulas="{len(used)}"', 1)
        (tmp / file).write_text(link_functions(text))
    shutil.copytree(node_modules / "katex" / "dist" / "fonts", tmp / "assets" / "katex" / "fonts")
    shutil.copy(node_modules / "katex" / "dist" / "katex.min.css", tmp / "assets" / "katex")
    from pygments.formatters import HtmlFormatter
    (tmp / "assets" / "pygments.css").write_text(HtmlFormatter(style="friendly").get_style_defs(".highlight"))
    shutil.copy(DOCS / "site.css", tmp / "assets" / "site.css")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"pages": len(pages), "formulas": len(math.formulas), "tags": len(entries)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="site", help="the folder the pages are written to (replaced whole)")
    parser.error = lambda message: (print(f"error: {message}; docs/build.py --help lists the flags", file=sys.stderr),
                                    sys.exit(2))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir() or out == ROOT or out in ROOT.parents:
        print(f"error: --out {args.out} is a file or holds the repository; name a folder of its own", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        counts = build(out)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{counts['pages']} pages, {counts['formulas']} formulas, {counts['tags']} tags in "
          f"{time.perf_counter() - start:.1f} s: open {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
