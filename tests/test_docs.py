"""The repository's text keeps up with its code: every cited equation tag is defined in the catalogue, copies of a
helper in several scripts stay identical, the README's table of differences between sibling scripts is current,
and no file links outside the repository."""

import ast
import difflib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["sft.py", "reinforce.py", "ppo.py", "reward.py", "grpo.py", "grpo_iterative.py", "gspo.py", "dpo.py",
           "rft.py", "trpo.py"]
TAG = re.compile(r"\[([A-Z][A-Z0-9]*(?:[-+][A-Z0-9]*)+|[A-Z]{2,}[A-Z0-9+]*)\]")


def cited_tags() -> set[str]:
    return {tag for path in [*SCRIPTS, "common.py", "plumbing.py"] for tag in TAG.findall((ROOT / path).read_text())}


def defined_tags() -> set[str]:
    headings = [line for line in (ROOT / "docs" / "equations.md").read_text().splitlines() if line.startswith("### ")]
    return {tag for line in headings for tag in TAG.findall(line)}


def test_every_cited_tag_is_defined_in_the_catalogue_and_nothing_else_is():
    cited, defined = cited_tags(), defined_tags()
    assert len(cited) >= 30  # the pattern finds the tags (a broken pattern would make both sets empty)
    assert sorted(cited - defined) == [], "cited in code, not defined in docs/equations.md"
    assert sorted(defined - cited) == [], "defined in docs/equations.md, cited nowhere"


def test_the_catalogue_names_a_function_that_exists_for_every_entry():
    text = (ROOT / "docs" / "equations.md").read_text()
    for script, function in set(re.findall(r"`(\w+\.py):(\w+)`", text)):
        if script not in [*SCRIPTS, "common.py", "plumbing.py"]:
            continue
        source = (ROOT / script).read_text()
        assert re.search(rf"^(def|class) {function}\b|^    def {function}\b", source, re.M), f"{script}:{function}"


def top_level_definitions(script: str) -> dict[str, str]:
    source = (ROOT / script).read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))
            and node.name not in ("Args", "check_flags", "main", "metrics_row")}  # each script's own by design


def test_a_helper_copied_into_several_scripts_is_the_same_code_in_each():
    """Duplication across scripts is by design (each reads alone), so its copies must not drift: the same name in
    two scripts means the same signature and body."""
    copies: dict[str, dict[str, str]] = {}
    for script in SCRIPTS:
        for name, source in top_level_definitions(script).items():
            copies.setdefault(name, {})[script] = source
    shared = {name: by_script for name, by_script in copies.items() if len(by_script) > 1}
    assert len(shared) >= 5
    drifted = {name: sorted(by_script) for name, by_script in shared.items() if len(set(by_script.values())) > 1}
    assert drifted == {}


def main_source(script: str) -> list[str]:
    source = (ROOT / script).read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return ast.get_source_segment(source, node).splitlines()


def differing_lines(left: list[str], right: list[str]) -> tuple[int, int]:
    """Lines only in left, lines only in right: what `diff` marks with < and >."""
    diff = list(difflib.unified_diff(left, right, lineterm="", n=0))[2:]
    return (sum(line.startswith("-") for line in diff), sum(line.startswith("+") for line in diff))


def sibling_table() -> str:
    """Each script against the script whose main() is closest to its own."""
    rows = ["| script | lines | nearest sibling | lines of `main()` only in the script / only in the sibling | "
            "lines of the whole file, likewise |", "| --- | --- | --- | --- | --- |"]
    for script in SCRIPTS:
        sibling = min((s for s in SCRIPTS if s != script),
                      key=lambda s: sum(differing_lines(main_source(script), main_source(s))))
        in_main = differing_lines(main_source(script), main_source(sibling))
        in_file = differing_lines(*((ROOT / s).read_text().splitlines() for s in (script, sibling)))
        lines = len((ROOT / script).read_text().splitlines())
        rows.append(f"| `{script}` | {lines} | `{sibling}` | {in_main[0]} / {in_main[1]} | {in_file[0]} / {in_file[1]} |")
    return "\n".join(rows)


def test_the_readme_table_of_sibling_differences_is_current():
    table = sibling_table()
    assert table in (ROOT / "README.md").read_text(), f"README.md should hold this table:\n{table}"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.md"), *ROOT.glob("*.py"),
                                                                          *ROOT.glob("docs/*.md"),
                                                                          *ROOT.glob("benchmarks/*.py"),
                                                                          *ROOT.glob("benchmarks/*/*.md")]))
def test_no_file_links_outside_the_repository(path):
    text = (ROOT / path).read_text()
    assert "../shared" not in text
    if not path.endswith(".md"):
        return
    assert not re.findall(r"\]\((?:\.\./|/)[^)]*\)", text)
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links resolve inside the repository
        resolved = ((ROOT / path).parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), target


if __name__ == "__main__":
    print(sibling_table())
