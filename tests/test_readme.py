"""The README's Python examples run as written (in order, in one namespace)."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_examples_run(capsys):
    blocks = python_blocks()
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        if "@nestrnn.hookimpl" in block:  # the plugin skeleton needs an installed package
            compile(block, "README.md", "exec")
            continue
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([2, 3, 20]) torch.Size([2, 2, 3, 20])" in printed
    assert type(namespace["rnn"].memory_l0).__name__ == "LeakyMemory"


def teardown_module():
    from nestrnn import registry

    registry._script_entries[:] = [e for e in registry._script_entries if e.name != "leaky"]
    registry.reset_registry()
