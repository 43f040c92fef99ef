"""Importing and using nestrnn on CPU never imports Triton (it is optional and heavy)."""

from __future__ import annotations

import subprocess
import sys


def test_nestrnn_does_not_import_triton():
    code = (
        "import sys, torch, nestrnn\n"
        "rnn = nestrnn.NestedLSTM(3, 4, memory='triton_nested')\n"
        "out, state = rnn(torch.randn(5, 2, 3))\n"
        "out.sum().backward()\n"
        "print(nestrnn.memory_names())\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "triton_nested" in result.stdout
