"""What importing and using nestrnn imports: never Triton on CPU, no task or training code for a layer."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its standard output."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_nestrnn_does_not_import_triton():
    """Importing nestrnn never imports Triton, and running on CPU never imports nestrnn's Triton
    kernels (the first custom-op call makes torch itself import torch._dynamo, which imports
    Triton when it is installed)."""
    code = (
        "import sys, torch, nestrnn\n"
        "assert 'triton' not in sys.modules, 'importing nestrnn imported triton'\n"
        "rnn = nestrnn.NestedLSTM(3, 4, memory='nested')\n"
        "out, state = rnn(torch.randn(5, 2, 3))\n"
        "out.sum().backward()\n"
        "print(nestrnn.memory_names())\n"
        "kernels = [m for m in sys.modules if m.startswith('nestrnn.ops.nested_lstm.triton')]\n"
        "assert not kernels, kernels\n"
    )
    assert "nested" in run_python(code)


def test_a_layer_imports_no_task_config_or_training_code():
    """Memory plugins load for a layer; tasks, omegaconf and the engine wait for a task lookup."""
    code = (
        "import sys, nestrnn\n"
        "heavy = ('nestrnn.tasks', 'nestrnn.engine', 'nestrnn.config', 'nestrnn.models', 'omegaconf')\n"
        "def imported():\n"
        "    return [h for h in heavy if any(m == h or m.startswith(h + '.') for m in sys.modules)]\n"
        "nestrnn.NestedLSTM(10, 20)\n"
        "print(imported())\n"
        "nestrnn.task_names()\n"
        "print(imported())\n"
    )
    after_layer, after_task_lookup = run_python(code).splitlines()
    assert after_layer == "[]"
    assert "'nestrnn.tasks'" in after_task_lookup and "'omegaconf'" in after_task_lookup


def test_a_training_run_imports_no_optional_extra_unless_asked(tmp_path):
    """TensorBoard (seconds to import) loads only with log.tensorboard=true; optuna, SQLAlchemy
    and scipy only for ``nestrnn sweep`` and ``nestrnn compare``."""
    code = (
        "import sys\n"
        "from nestrnn.cli import build_parser\n"
        "from nestrnn.config import load_config\n"
        "from nestrnn.engine.trainer import Trainer\n"
        "build_parser()\n"
        "config = load_config([], ['task.length=5', 'task.valid_size=8', 'task.test_size=8',\n"
        "    'model.hidden_size=4', 'train.batch_size=4', 'train.epochs=1',\n"
        "    'train.steps_per_epoch=2', 'train.progress=false'])\n"
        f"Trainer(config, {str(tmp_path / 'run')!r}, echo=None).fit()\n"
        "extras = ('tensorboard', 'optuna', 'sqlalchemy', 'scipy')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in extras))\n"
    )
    assert run_python(code).strip() == "[]"
