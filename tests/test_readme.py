"""Every Python example in README.md and docs/*.md runs as pasted, each in its own process.

A block whose first line is a comment naming a file (``# leaky.py``) is that file: later blocks of
the same document find it beside them (``from leaky import LeakyMemory``), and a ``test_*.py`` file
runs under pytest. A block right after ``<!-- not run: REASON -->`` is only compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
FILE_NAME = re.compile(r"# (?P<name>[\w/]+\.py)\n")


@dataclass(frozen=True)
class Block:
    document: Path
    index: int
    code: str
    not_run: str | None  # why it is only compiled

    @property
    def file_name(self) -> str | None:
        match = FILE_NAME.match(self.code)
        return match["name"] if match else None

    @property
    def id(self) -> str:
        return f"{self.document.name}-{self.index}-{self.file_name or 'snippet'}"


def blocks() -> list[Block]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for index, match in enumerate(BLOCK.finditer(text)):
            found.append(Block(document, index, match["code"], match["reason"]))
    return found


ALL = blocks()


def test_the_examples_are_found():
    assert len([b for b in ALL if b.document.name == "README.md"]) >= 6
    assert all(b.not_run is None or b.not_run.strip() for b in ALL)


def slow(block: Block) -> bool:
    """Running a test file, or exporting through torch.export and ONNX, takes half a minute."""
    return (block.file_name or "").startswith("test_") or "torch.onnx.export" in block.code


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow(b) else []) for b in ALL]
)
def test_example_runs_as_pasted(block: Block, tmp_path: Path):
    compile(block.code, str(block.document), "exec")
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    for earlier in ALL:  # the files the document asked to save before this one
        if earlier.document == block.document and earlier.index < block.index and earlier.file_name:
            (tmp_path / earlier.file_name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / earlier.file_name).write_text(earlier.code, encoding="utf-8")
    path = tmp_path / (block.file_name or "example.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.code, encoding="utf-8")
    command = [sys.executable, str(path)]
    if (block.file_name or "").startswith("test_"):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path.name]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # as when run beside the saved files
    env.pop("PYTHONSAFEPATH", None)
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout}\n{result.stderr}"
    if block.document.name == "README.md" and block.index == 0:
        assert "torch.Size([2, 3, 20]) torch.Size([2, 2, 3, 20])" in result.stdout
