"""README.md points only at what a clone holds: a relative link resolves inside the repository, and a
path outside it (`../...`) is named only where the README says it is outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def paragraphs() -> list[str]:
    return README.split("\n\n")


def test_relative_links_resolve_inside_the_repository():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if re.match(r"[a-z]+://", target):
            continue
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README links to {target}, which a clone does not hold"


def test_a_path_outside_the_repository_is_said_to_be_outside():
    for para in paragraphs():
        for path in re.findall(r"`(\.\./[^`]*)`", para):
            assert "outside this repository" in para, f"README names {path} as if a clone held it: {para!r}"
