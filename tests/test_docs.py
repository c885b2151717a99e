"""Every heading of docs/design.md that a docstring or comment cites by name exists.

Source in hub_msif/, bench/ and tests/ cites the design by quoted heading: ``docs/design.md,
"Memory plan"``, ``docs/design.md ("Errors")`` or ``docs/design.md "Refined queries"``, several
names separated by commas or "and". A cited name that is only a bold paragraph, or a heading that
was renamed, fails here with the file that cites it.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

# "docs/design.md" then ", " or " (" or " ", then one or more quoted names joined by , ; or "and".
_CITATION = re.compile(r'docs/design\.md(?:,\s*|\s*\(\s*|\s+)((?:"[^"\n]+"(?:\s*(?:,|;|and)\s*(?="))?)+)')


def headings() -> set[str]:
    text = DESIGN.read_text(encoding="utf-8")
    return {m.group(1).strip() for m in re.finditer(r"^#+\s+(.+?)\s*#*\s*$", text, re.MULTILINE)}


def citations() -> list[tuple[str, str]]:
    """(cited name, file) for every citation; a citation may wrap over lines (comment or docstring)."""
    found = []
    for folder in ("hub_msif", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            # Join wrapped lines: a newline, its indentation and a comment's "#" read as one space.
            text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text(encoding="utf-8"))
            for match in _CITATION.finditer(text):
                found += [(name, str(path.relative_to(ROOT))) for name in re.findall(r'"([^"]+)"', match.group(1))]
    return found


def test_citations_are_found():
    names = {name for name, _ in citations()}
    assert len(names) >= 20, names  # the pattern still matches how the source cites the design
    assert {"Memory plan", "Low-rank queries", "Errors"} <= names


def test_every_cited_heading_exists():
    known = headings()
    missing = sorted({(name, path) for name, path in citations() if name not in known})
    assert not missing, "cited in source but not a heading of docs/design.md: " + "; ".join(
        f"{name!r} ({path})" for name, path in missing)


def test_the_test_would_catch_a_missing_heading(tmp_path):
    assert "Low-rank queries" in headings() and "No such heading" not in headings()
    text = 'x = 1  # docs/design.md, "Memory plan" and\n    # "No such heading"\n'
    joined = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)
    assert re.findall(r'"([^"]+)"', _CITATION.search(joined).group(1)) == ["Memory plan", "No such heading"]
