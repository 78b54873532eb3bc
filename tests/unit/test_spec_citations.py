"""Every spec a comment or docstring cites exists, with the section it names.

Code explains *why* by citing ``specs/`` — ``specs/engine.md, "The commit rule
(ORI)"`` — so a reader can follow the citation. A renamed heading or a moved
file silently turns such a citation into a dead end; so does a citation of a
document that is not in the repository at all (the original design brief,
``DESIGN.md``). This test reads every Python file under ``oribus/``, ``tests/``
and ``benchmarks/`` and checks each citation against ``specs/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
SCANNED = ("oribus", "tests", "benchmarks")

# ``specs/<file>.md``, optionally in double backticks, optionally followed by a
# comma or colon and a quoted section title, which may wrap onto the next line
# of a docstring (``"The commit rule\n    (ORI)"``).
CITATION = re.compile(
    r"specs/(?P<file>[A-Za-z0-9_./-]+\.md)(?:``)?"
    r"(?:\s*[,:]\s*\"(?P<title>[^\"]+)\")?"
)
# A heading's leading section number ("3. ", "5.3 ") is not part of its title.
SECTION_NUMBER = re.compile(r"^\d+(?:\.\d+)*\.?\s+")
FORBIDDEN = re.compile(r"\bDESIGN\.md\b")
THIS_FILE = Path(__file__).resolve()


def normalise(title: str) -> str:
    return " ".join(title.split()).casefold()


def headings(spec: Path) -> set[str]:
    found: set[str] = set()
    in_fence = False
    for line in spec.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            text = line.lstrip("#").strip()
            found.add(normalise(text))
            found.add(normalise(SECTION_NUMBER.sub("", text)))
    return found


def python_files(root: Path) -> list[Path]:
    return sorted(
        p for top in SCANNED for p in (root / top).rglob("*.py")
        if ".venv" not in p.parts and p.resolve() != THIS_FILE
    )


def citations(root: Path) -> list[tuple[str, int, str, str | None]]:
    """(file relative to root, line, cited spec file, quoted title or None) for every citation."""
    out = []
    for path in python_files(root):
        text = path.read_text(encoding="utf-8")
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((str(path.relative_to(root)), line, m.group("file"), m.group("title")))
    return out


def dangling(root: Path) -> list[str]:
    """A line per citation whose spec file or section does not exist under ``root/specs``."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for where, line, file, title in citations(root):
        spec = root / "specs" / file
        if not spec.is_file():
            problems.append(f"{where}:{line}: specs/{file} does not exist")
            continue
        if title is not None:
            known = cache.setdefault(spec, headings(spec))
            if normalise(title) not in known:
                problems.append(f'{where}:{line}: specs/{file} has no heading "{title}"')
    return problems


def outside_citations(root: Path) -> list[str]:
    """A line per citation of DESIGN.md, a document that is not part of the repository."""
    problems = []
    for path in python_files(root):
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN.search(text):
                problems.append(f"{path.relative_to(root)}:{n}: cites DESIGN.md: {text.strip()}")
    return problems


def test_every_cited_spec_file_and_section_exists():
    assert citations(ROOT), "no citation of specs/ found: the scan itself is broken"
    assert dangling(ROOT) == []


def test_no_file_cites_the_design_brief_outside_the_repository():
    assert outside_citations(ROOT) == []


def test_architecture_map_exists_and_is_linked_from_the_readme():
    assert (SPECS / "ARCHITECTURE.md").is_file()
    assert "specs/ARCHITECTURE.md" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "engine.md").write_text(
        "# Engine\n\n## 3. Sessions: scopes and failing closed\n\n```\n# not a heading\n```\n"
    )
    for top in SCANNED:
        (tmp_path / top).mkdir()
    return tmp_path


def test_a_citation_of_a_missing_section_or_file_is_reported(tree: Path):
    (tree / "oribus" / "a.py").write_text(
        '"""Fine (specs/engine.md, "sessions: SCOPES and\n    failing closed").\n\n'
        'Also fine: ``specs/engine.md``; not fine: specs/engine.md, "not a heading";\n'
        'nor specs/gone.md."""\n'
    )
    assert dangling(tree) == [
        'oribus/a.py:4: specs/engine.md has no heading "not a heading"',
        "oribus/a.py:5: specs/gone.md does not exist",
    ]


def test_a_citation_of_the_design_brief_is_reported(tree: Path):
    (tree / "tests" / "b.py").write_text('"""The rule (DESIGN.md, "The commit rule (ORI)")."""\n')
    assert outside_citations(tree) == [
        'tests/b.py:1: cites DESIGN.md: """The rule (DESIGN.md, "The commit rule (ORI)")."""'
    ]
