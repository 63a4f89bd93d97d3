"""Code cites the method notes in docs/ or papers, never a file outside the repository, and every citation of the
notes names a page and a heading that exist.

A citation is ``docs/PAGE.md`` or ``docs/PAGE.md, SECTION``; after the comma the text must start with a heading of
that page (any level), written as the heading is. Citations may wrap onto the next line of a docstring or comment.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"

PENDING: frozenset[str] = frozenset()
"""Files that still cite a file outside the repository, left alone while other branches rewrite them (the SAE
architecture registry and the interpretation-scorer registry, issue 12). The lead engineer replaces their citations
after merging those branches and empties this set; ``test_pending__lists_only_files_that_still_need_the_fix`` fails
for every entry that no longer needs to be here."""

# The algorithm notes kept outside the repository and their folder; a relative path that climbs out of the
# repository ("../shared"; not ".../x").
_OUTSIDE = re.compile(r"ALGORITHMS\.md|shared/reference|/work/shared|(?<![.\w])\.\./")
_CITATION = re.compile(r"docs/([A-Za-z0-9_-]+)\.md(?:, )?")
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".html", ".cfg", ".txt"}
_SKIPPED_DIRS = {"__pycache__", "runs", "build", "dist"}


@cache
def _tracked_files() -> tuple[str, ...]:
    """Repository-relative paths of the files git tracks or would track (not ignored); where the tree is not a git
    checkout, every file outside hidden and build folders."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split("\n")
        return tuple(path for path in listing if path and (ROOT / path).is_file())
    except (OSError, subprocess.SubprocessError):
        found = []
        for path in ROOT.rglob("*"):
            parts = path.relative_to(ROOT).parts
            if path.is_file() and not any(
                p.startswith(".") or p in _SKIPPED_DIRS or p.endswith(".egg-info") for p in parts
            ):
                found.append(path.relative_to(ROOT).as_posix())
        return tuple(sorted(found))


def _text_files() -> list[str]:
    """The files whose citations are checked: every text file but this one (its examples are odd on purpose)."""
    this = Path(__file__).relative_to(ROOT).as_posix()
    return [p for p in _tracked_files() if (Path(p).suffix in _TEXT_SUFFIXES or p.endswith("Makefile")) and p != this]


def _code_outside_tests() -> list[str]:
    return [p for p in _tracked_files() if p.endswith(".py") and not p.startswith("tests/")]


def _flat(text: str) -> str:
    """The text as one line: every line stripped of its indentation and comment marker, joined by single spaces, so
    that a citation wrapped across lines of a comment or docstring reads as written."""
    return " ".join(line.strip().lstrip("#").strip() for line in text.splitlines())


@cache
def _headings(page: str) -> tuple[str, ...]:
    """The headings of ``docs/{page}.md``, outside fenced code blocks."""
    headings, fenced = [], False
    for line in (DOCS / f"{page}.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            headings.append(line.lstrip("#").strip())
    return tuple(headings)


def _citations(path: str) -> list[tuple[str, str | None]]:
    """(page, text after ", " or None) for every docs citation in ``path``."""
    text = _flat((ROOT / path).read_text(errors="replace"))
    return [
        (match.group(1), text[match.end() : match.end() + 200] if match.group(0).endswith(", ") else None)
        for match in _CITATION.finditer(text)
    ]


def _cited_heading(page: str, rest: str) -> str | None:
    """The longest heading of ``page`` that ``rest`` starts with, followed by a non-word character."""
    matches = [h for h in _headings(page) if rest.startswith(h) and not rest[len(h) : len(h) + 1].isalnum()]
    return max(matches, key=len, default=None)


def _cites_outside(path: str) -> list[str]:
    return [
        f"{path}:{number}: {line.strip()}"
        for number, line in enumerate((ROOT / path).read_text(errors="replace").splitlines(), 1)
        if _OUTSIDE.search(line)
    ]


def test_code__cites_nothing_outside_the_repository():
    bad = [hit for path in _code_outside_tests() if path not in PENDING for hit in _cites_outside(path)]
    assert not bad, "cite docs/<page>.md, <Section> or the paper instead:\n" + "\n".join(bad)


def test_pending__lists_only_files_that_still_need_the_fix():
    tracked = set(_code_outside_tests())
    stale = sorted(path for path in PENDING if path not in tracked or not _cites_outside(path))
    assert not stale, f"remove from PENDING (fixed, or no longer in the repository): {stale}"


def test_docs__every_page_lists_its_papers():
    pages = sorted(DOCS.glob("*.md"))
    assert {p.stem for p in pages} >= {"README", "sae", "send", "interpret"}
    missing = [p.name for p in pages if p.stem != "README" and "Sources" not in _headings(p.stem)]
    assert not missing, f"method pages without a 'Sources' section: {missing}"


def test_citations__name_pages_and_sections_that_exist():
    bad, cited = [], 0
    for path in _text_files():
        for page, rest in _citations(path):
            cited += 1
            if not (DOCS / f"{page}.md").is_file():
                bad.append(f"{path}: docs/{page}.md does not exist")
            elif rest is not None and _cited_heading(page, rest) is None:
                bad.append(
                    f"{path}: docs/{page}.md has no section at the start of {rest[:60]!r}; its sections: "
                    f"{', '.join(_headings(page))}"
                )
    assert cited, "no docs citation found at all: is the file listing broken?"
    assert not bad, "\n".join(bad)


def test_citation_check__catches_a_missing_section_and_a_wrapped_valid_one():
    assert _cited_heading("send", "Sensitivity).") == "Sensitivity"
    assert _cited_heading("send", "Efficient EigenScore; more") == "Efficient EigenScore"
    assert _cited_heading("sae", "Resamplings") is None
    assert _flat("x = 1  # see docs/send.md, Efficient\n    # EigenScore.").endswith(
        "docs/send.md, Efficient EigenScore."
    )
    assert _OUTSIDE.search("see ../shared/reference") and not _OUTSIDE.search("``.../checkpoints/last.ckpt``")
