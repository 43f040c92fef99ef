"""docs/environment.md lists every ``NESTRNN_*`` environment variable the code reads, and no other.

The sources are read as text (Python, C, C++, shell), so that a variable read through a constant
(``URL_ENV = "NESTRNN_PTB_URL"``) or in a compiled file counts too.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("nestrnn", "tasks", "plugins", "benchmarks")
SUFFIXES = {".py", ".c", ".h", ".cpp", ".sh"}
NAME = re.compile(r"\bNESTRNN_[A-Z0-9_]*[A-Z0-9]\b")
#: names of the NESTRNN_ form that are no environment variable (a C++ macro set at compile time)
NOT_ENVIRONMENT = {"NESTRNN_MODULE_NAME"}


def names_in_code() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and "build" not in path.parts:
                for name in set(NAME.findall(path.read_text(errors="replace"))):
                    found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return {name: files for name, files in found.items() if name not in NOT_ENVIRONMENT}


def names_in_table() -> set[str]:
    rows = (REPO / "docs" / "environment.md").read_text().splitlines()
    return {m.group(1) for row in rows if (m := re.match(r"\| `(NESTRNN_[A-Z0-9_]+)` \|", row))}


def test_every_variable_the_code_reads_is_in_the_table():
    code, table = names_in_code(), names_in_table()
    assert len(code) >= 10, "the sources were not found"
    missing = {name: files for name, files in code.items() if name not in table}
    assert not missing, f"add to docs/environment.md: {missing}"
    stale = table - set(code)
    assert not stale, f"docs/environment.md lists variables the code no longer reads: {stale}"


def test_the_table_is_linked_from_the_readme_and_the_training_guide():
    for doc in ("README.md", "docs/training.md"):
        assert "environment.md" in (REPO / doc).read_text(), doc
