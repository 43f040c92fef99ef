"""A saved NestedLSTM runs where nestrnn is not imported: a traced module, an ExportedProgram, an
AOTInductor package, loaded in a fresh Python process that never imports nestrnn, or in a C++
program, with the library of ``nestrnn.export.library_path()`` loaded there."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_native import require_program

import nestrnn
from nestrnn.export import library_path

# (name, NestedLSTM arguments): depth 1 (torch's kernel in eager mode), 2, 3, and two
# bidirectional layers (four ops in one graph, the second layer reading the first's output)
MODELS = [
    ("depth1", dict(input_size=3, hidden_size=5, depth=1)),
    ("depth2", dict(input_size=3, hidden_size=5, depth=2)),
    ("depth3", dict(input_size=3, hidden_size=4, depth=3)),
    ("bidirectional", dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, depth=2)),
    ("projected", dict(input_size=3, hidden_size=5, proj_size=2, depth=2)),
]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="module")
def library() -> Path:
    require_program(_compiler(), "C++ compiler")
    return library_path()


def _models() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    made = []
    for name, arguments in MODELS:
        model = nestrnn.NestedLSTM(**arguments).eval()
        made.append((name, model, torch.randn(6, 2, arguments["input_size"])))
    return made


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _flat(item)]


def _run_without_nestrnn(script: str, *arguments: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python that loads the library first and must not import
    nestrnn (it asserts so at its end)."""
    prologue = "import sys, torch\ntorch.ops.load_library(sys.argv[1])\n"
    epilogue = "\nassert 'nestrnn' not in sys.modules, 'nestrnn was imported'\nprint('ok')\n"
    code = prologue + textwrap.dedent(script) + epilogue
    done = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",  # not the checkout: nestrnn must not be importable by accident
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    return done


# Compares every saved model's outputs with the eager ones saved beside it.
_COMPARE = """
from pathlib import Path
folder = Path(sys.argv[2])
for name in sys.argv[3:]:
    x, expected = torch.load(folder / f"{name}.expected.pt")
    model = (LOAD)(folder / name)
    with torch.no_grad():
        got = model(x)
    flat = lambda v: [v] if isinstance(v, torch.Tensor) else [t for i in v for t in flat(i)]
    got = flat(got)
    assert len(got) == len(expected), (name, len(got), len(expected))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)
"""


def _save_expected(folder: Path, name: str, model, x) -> None:
    with torch.no_grad():
        torch.save((x, _flat(model(x))), folder / f"{name}.expected.pt")


def test_traced_module_runs_without_nestrnn(library, tmp_path):
    names = []
    for name, model, x in _models():
        with torch.no_grad():
            torch.jit.trace(model, (x,)).save(str(tmp_path / name))
        _save_expected(tmp_path, name, model, x)
        names.append(name)
    load = "lambda path: torch.jit.load(str(path))"
    _run_without_nestrnn(_COMPARE.replace("LOAD", load), str(library), str(tmp_path), *names)


def test_exported_program_runs_without_nestrnn(library, tmp_path):
    names = []
    for name, model, x in _models():
        program = torch.export.export(model, (x,))
        torch.export.save(program, tmp_path / name)
        _save_expected(tmp_path, name, model, x)
        names.append(name)
    load = "lambda path: torch.export.load(path).module()"
    _run_without_nestrnn(_COMPARE.replace("LOAD", load), str(library), str(tmp_path), *names)


def test_library_in_a_process_with_nestrnn_changes_nothing(library):
    """Loaded after nestrnn, the library leaves nestrnn's operator (autograd and all) in place;
    loaded before, importing nestrnn stops with one clear error."""
    after = f"""
import ctypes, torch, nestrnn
torch.ops.load_library({str(library)!r})
assert ctypes.CDLL({str(library)!r}).nestrnn_torch_library_registered() == 0
layer = nestrnn.NestedLSTM(3, 4, depth=2)
layer(torch.randn(5, 2, 3))[0].sum().backward()
assert layer.weight_ih_l0.grad is not None
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", after], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    before = f"import torch\ntorch.ops.load_library({str(library)!r})\nimport nestrnn\n"
    done = subprocess.run(
        [sys.executable, "-c", before], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the operator nestrnn::nested_lstm is already defined")
    assert "import nestrnn first" in last


_PROGRAM = Path(__file__).parent / "no_python_program.cpp"


@pytest.fixture(scope="module")
def program() -> Path:
    """tests/no_python_program.cpp built against this torch's libtorch (about 40 s), kept in the
    temporary folder between runs under a name hashing the source, torch and compiler."""
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        _compiler(),
        *("-O1", "-std=c++20", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"),
        f"-I{root / 'include'}",
        f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        str(_PROGRAM),
        f"-L{root / 'lib'}",
        f"-Wl,-rpath,{root / 'lib'}",
        *("-lc10", "-ltorch_cpu", "-ltorch", "-ldl"),
    ]
    key = hashlib.sha256(_PROGRAM.read_bytes() + " ".join([*command, torch.__version__]).encode())
    folder = Path(tempfile.gettempdir()) / f"nestrnn-tests-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    binary = folder / f"no_python_program-{key.hexdigest()[:16]}"
    if not binary.exists():
        partial = folder / f"{binary.name}.{os.getpid()}"
        done = subprocess.run(
            [*command, "-o", str(partial)], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        os.replace(partial, binary)  # whole or absent, for the next run
    return binary


@pytest.mark.slow
def test_traced_module_runs_in_a_cpp_program(library, program, tmp_path):
    """No Python at all: a C++ program dlopens the library, loads the TorchScript file, prints."""
    for name, model, x in _models():
        with torch.no_grad():
            torch.jit.trace(model, (x,)).save(str(tmp_path / name))
            expected = torch.cat([t.flatten() for t in _flat(model(x))]).double()
        numbers = " ".join(map(str, x.shape)) + "\n" + " ".join(f"{v:.9g}" for v in x.flatten())
        done = subprocess.run(
            [str(program), str(library), str(tmp_path / name)],
            input=numbers,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        got = torch.tensor([float(line) for line in done.stdout.split()], dtype=torch.double)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_aot_inductor_package_runs_without_nestrnn(library, tmp_path):
    """AOTInductor compiles a C++ wrapper around the op's call (minutes on 2 cores): one model."""
    name, model, x = _models()[1]
    package = torch._inductor.aoti_compile_and_package(
        torch.export.export(model, (x,)), package_path=str(tmp_path / f"{name}.pt2")
    )
    _save_expected(tmp_path, name, model, x)
    load = "lambda path: torch._inductor.aoti_load_package(str(path) + '.pt2')"
    _run_without_nestrnn(_COMPARE.replace("LOAD", load), str(library), str(tmp_path), name)
    assert Path(package).exists()
