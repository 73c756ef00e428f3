"""README.md and docs/: the README stays short, every relative link resolves, every docs page is
linked from the README, and the README's test command is the one CI runs.

Plain file reads: no network, no servers. The link checker is tested on small broken examples too,
so a checker that found nothing could not pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
CI = REPO / ".ci" / "run"
MAX_README_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...
PYTEST = re.compile(r"^\s*(\.venv/bin/python -m pytest\b.*?)\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings in code do not count)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation other than - and _ dropped, spaces
    to -. Inline markup (backticks, emphasis, link syntax) is dropped with the punctuation."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[str]:
    """The link targets of a markdown file, outside code blocks and inline code."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def broken_links(path: Path) -> list[str]:
    """Relative links of `path` whose file, or whose #anchor in that file, does not exist."""
    broken = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def readme_test_command() -> str:
    commands = [
        m.group(1)
        for line in code_lines(README.read_text(encoding="utf-8"))
        if (m := PYTEST.match(line))
    ]
    assert len(commands) == 1, f"the README should show one test command, found {commands}"
    return commands[0]


def ci_test_command() -> str:
    commands = [
        m.group(1)
        for line in CI.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#") and (m := PYTEST.match(line))
    ]
    assert len(commands) == 1, f".ci/run should run one test command, found {commands}"
    return commands[0]


# ----------------------------------------------------------------------------- the repository


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines: move some to docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert links(path) or path.name == "ui-test.md", f"{path.name}: no links found at all"
    broken = broken_links(path)
    assert broken == [], f"{path.name}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    linked = {
        (README.parent / t.partition("#")[0]).resolve()
        for t in links(README)
        if not EXTERNAL.match(t) and t.partition("#")[0]
    }
    unlinked = [p.name for p in pages if p.resolve() not in linked]
    assert unlinked == [], f"docs pages the README does not link: {unlinked}"


def test_readme_test_command_is_the_one_ci_runs():
    readme, ci = readme_test_command(), ci_test_command()
    assert readme == ci, f"README.md says {readme!r}, .ci/run runs {ci!r}"


# ----------------------------------------------------------------------------- the helpers


def test_slug_follows_github():
    assert slug("Precision and threads") == "precision-and-threads"
    assert slug("The team stack: deploy/compose.yaml") == "the-team-stack-deploycomposeyaml"
    assert slug("Several machines (multi-node)") == "several-machines-multi-node"
    assert slug("Presets (`configs/`)") == "presets-configs"
    assert slug("Large corpora: shards, Dask or Ray, streaming") == (
        "large-corpora-shards-dask-or-ray-streaming"
    )


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.md").write_text(
        "# Page\n\n## Two words\n\n## Two words\n\n```bash\n# not a heading\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](sub/page.md) [ok anchor](sub/page.md#two-words) [dup](sub/page.md#two-words-1)\n"
        "![ok image](img.png) [here](#top) [web](https://example.com/missing.md)\n"
        "[missing file](sub/nope.md) [missing anchor](sub/page.md#three-words)\n"
        "[code heading](sub/page.md#not-a-heading)\n"
        "![gone](screenshots/gone.png) [missing here](#bottom)\n"
        "`[in code](not/checked.md)`\n\n"
        "```\n[in a block](not/checked/either.md)\n```\n",
        encoding="utf-8",
    )
    broken = broken_links(tmp_path / "README.md")
    assert [b.split(":")[0] for b in broken] == [
        "sub/nope.md",
        "sub/page.md#three-words",
        "sub/page.md#not-a-heading",
        "screenshots/gone.png",
        "#bottom",
    ], broken
    assert "sub/page.md" in links(tmp_path / "README.md")


def test_test_command_helpers_see_a_drift(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    ci = tmp_path / "run"
    readme.write_text("```bash\n.venv/bin/python -m pytest -q\n```\n", encoding="utf-8")
    ci.write_text(
        "# the README's test command\n.venv/bin/python -m pytest -q -p no:cacheprovider\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(f"{__name__}.README", readme)
    monkeypatch.setattr(f"{__name__}.CI", ci)
    assert readme_test_command() == ".venv/bin/python -m pytest -q"
    assert ci_test_command() == ".venv/bin/python -m pytest -q -p no:cacheprovider"
    assert readme_test_command() != ci_test_command()
    readme.write_text("no command here\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="one test command"):
        readme_test_command()
