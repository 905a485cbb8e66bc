"""The documentation site: every page of docs/ is reachable from the site's table of contents,
and every relative link between the pages (and from the README) reaches an existing page and
heading.

``nox -s docs`` builds the site with Sphinx, warnings as errors, and fails on the same
mistakes; this test reads the Markdown itself, so the suite catches them without Sphinx.
The toctrees are read from the pages (``{toctree}`` blocks, starting at the root page named
in docs/conf.py), never from a list kept here: a new page is checked as soon as it exists.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

FENCE = re.compile(r"(`{3,}|~{3,})(.*)")
HEADING = re.compile(r"(#{1,6})\s+(.*?)(?:\s+#+)?\s*")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def conf(docs: Path) -> dict[str, Any]:
    """The literal settings of docs/conf.py (read, not run: Sphinx may not be installed)."""
    found: dict[str, Any] = {}
    for node in ast.parse((docs / "conf.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return found


def split(text: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The fenced blocks (info string, lines) and the lines outside them."""
    blocks: list[tuple[str, list[str]]] = []
    prose: list[str] = []
    fence = None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None:
            opening = FENCE.fullmatch(stripped)
            if opening:
                fence = opening.group(1)
                blocks.append((opening.group(2).strip(), []))
            else:
                prose.append(line)
        elif stripped.startswith(fence) and not stripped.strip(fence[0]):
            fence = None
        else:
            blocks[-1][1].append(line)
    return blocks, prose


def pages(docs: Path) -> dict[str, Path]:
    """Every page of the site by document name, less what conf.py excludes."""
    excluded = conf(docs).get("exclude_patterns", [])
    found = {}
    for path in docs.rglob("*.md"):
        name = path.relative_to(docs).with_suffix("").as_posix()
        rel = path.relative_to(docs).as_posix()
        if not any(fnmatch.fnmatch(rel, p) or rel.startswith(f"{p}/") for p in excluded):
            found[name] = path
    return found


def toctree_entries(path: Path, docs: Path) -> list[str]:
    """The document names listed in the page's toctrees (``Title <name>`` entries too)."""
    entries = []
    for info, lines in split(path.read_text())[0]:
        if info != "{toctree}":
            continue
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith(":"):
                continue
            entry = re.sub(r".*<(.+)>$", r"\1", entry).removesuffix(".md")
            # Relative to the page's folder; "/name" from docs/ itself.
            folder = Path() if entry.startswith("/") else path.parent.relative_to(docs)
            entries.append((folder / entry.lstrip("/")).as_posix())
    return entries


def unreachable(docs: Path) -> list[str]:
    """Pages not reachable from the root page through toctrees, and toctree entries that
    name no page."""
    known = pages(docs)
    root = str(conf(docs).get("root_doc", "index"))
    problems, seen, todo = [], {root}, [root]
    while todo:
        name = todo.pop()
        for entry in toctree_entries(known[name], docs):
            if entry not in known:
                problems.append(f"{name}.md: toctree entry {entry!r} is no page of docs/")
            elif entry not in seen:
                seen.add(entry)
                todo.append(entry)
    problems += [f"{name}.md is in no toctree" for name in sorted(set(known) - seen)]
    return problems


def slugs(path: Path, depth: int) -> set[str]:
    """The heading anchors MyST makes (``myst_heading_anchors``), as GitHub makes them."""
    found: set[str] = set()
    for line in split(path.read_text())[1]:
        heading = HEADING.fullmatch(line)
        if not heading or len(heading.group(1)) > depth:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(2)).replace("`", "")
        slug = base = re.sub(r"[^\w\u4e00-\u9fff\- ]", "", title.lower().replace(" ", "-"))
        count = 0
        while slug in found:
            count += 1
            slug = f"{base}-{count}"
        found.add(slug)
    return found


def broken_links(docs: Path, sources: list[Path]) -> list[str]:
    """Relative links in ``sources`` that leave docs/ (from a docs page), or name a file or a
    heading that does not exist."""
    depth = conf(docs).get("myst_heading_anchors", 0)
    docs = docs.resolve()
    problems = []
    for source in map(Path.resolve, sources):
        prose = re.sub(r"`[^`]*`", "", "\n".join(split(source.read_text())[1]))
        for target in LINK.findall(prose):
            if SCHEME.match(target):
                continue
            file, _, anchor = target.partition("#")
            path = (source.parent / file).resolve() if file else source
            where = f"{source.name}: ({target})"
            if source.is_relative_to(docs) and not path.is_relative_to(docs):
                problems.append(f"{where} leaves docs/: the site cannot link there")
            elif not path.exists():
                problems.append(f"{where}: no such file")
            elif anchor and (path.suffix != ".md" or anchor not in slugs(path, depth)):
                problems.append(f"{where}: no heading with that anchor")
    return problems


def test_every_page_is_in_the_table_of_contents():
    """A page in docs/ that no toctree lists is built but no reader finds it."""
    assert unreachable(DOCS) == []


def test_links_between_pages_reach_a_page_and_heading():
    """Links between docs pages, and from the README into docs/, work on GitHub and on the
    site alike."""
    sources = [ROOT / "README.md", *sorted(pages(DOCS).values())]
    assert broken_links(DOCS, sources) == []


def test_the_checks_find_an_unlisted_page_and_broken_links(tmp_path):
    """The checks above are not vacuous."""
    (tmp_path / "conf.py").write_text('root_doc = "index"\nmyst_heading_anchors = 2\n')
    (tmp_path / "index.md").write_text(
        "# Home\n\n```{toctree}\n:hidden:\n\nguide\nGone <gone>\n```\n\n"
        "[ok](guide.md#the-setup) [bad](guide.md#nothing) [deep](guide.md#detail)"
        " [out](../README.md) [web](https://example.com/x.md) `[code](nowhere.md)`\n"
    )
    (tmp_path / "guide.md").write_text("# Guide\n\n## The `setup`\n\n### Detail\n")
    (tmp_path / "orphan.md").write_text("# Orphan\n")
    assert unreachable(tmp_path) == [
        "index.md: toctree entry 'gone' is no page of docs/",
        "orphan.md is in no toctree",
    ]
    problems = broken_links(tmp_path, [tmp_path / "index.md"])
    assert [p.split(": ", 1)[1] for p in problems] == [
        "(guide.md#nothing): no heading with that anchor",
        "(guide.md#detail): no heading with that anchor",
        "(../README.md) leaves docs/: the site cannot link there",
    ]
