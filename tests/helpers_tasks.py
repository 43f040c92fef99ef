"""Shared helpers for the task, download, engine and CLI tests: fixture writers, a local HTTP
server, tiny configurations and the location of the optional real data."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: the NestedLSTM backend the tests use (NESTRNN_TEST_BACKEND=generic runs them on that path)
BACKEND = os.environ.get("NESTRNN_TEST_BACKEND") or "auto"

#: overrides that make any run tiny and quiet
TINY = [
    "model.hidden_size=8",
    "model.embedding_dim=4",
    f"model.backend={BACKEND}",
    "train.progress=false",
    "train.threads=1",
    "train.log_every=1",
]


def shared_data_dir() -> Path | None:
    """The real data for optional tests: ``$NESTRNN_DATA_DIR`` or ``../shared/data``; None if absent."""
    env = os.environ.get("NESTRNN_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


# --------------------------------------------------------------------------- fixture writers


def ptb_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "aer", "banknote", "n", "rose"]
    lines = []
    for _ in range(count):
        sentence = "_".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
        lines.append(" ".join(sentence) + " ")
    return lines


def write_ptb(folder: Path, lines_per_split: Sequence[int] = (60, 12, 12)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, count) in enumerate(zip(("train", "valid", "test"), lines_per_split)):
        text = "\n".join(ptb_lines(count, seed)) + "\n"
        (folder / f"ptb.char.{split}.txt").write_text(text)
    return folder


def text8_bytes(length: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = ["anarchism", "originated", "as", "a", "term", "of", "abuse", "first", "used"]
    out = []
    size = 0
    while size < length:
        word = rng.choice(words) + " "
        out.append(word)
        size += len(word)
    return "".join(out).encode()[:length]


def write_text8_zip(folder: Path, total: int, name: str = "text8.zip") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("text8", text8_bytes(total))
    return path


POEM_CHARS = (
    "春眠不觉晓处处闻啼鸟夜来风雨声花落知多少床前明月光疑是地上霜举头望山低思故乡白日依尽黄河入海流"
)


def quatrain(rng: random.Random, length: int) -> str:
    return "\t".join(" ".join(rng.choice(POEM_CHARS) for _ in range(length)) for _ in range(4))


def write_poems(folder: Path, counts: Sequence[int] = (40, 8, 8), names: str = "all") -> Path:
    """Quatrain files; ``names``: "all" (qtrain...), "split" (qtrain5/qtrain7...)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, count in zip(("train", "valid", "test"), counts):
        if names == "all":
            lines = [quatrain(rng, rng.choice((5, 7))) for _ in range(count)]
            (folder / f"q{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            for length in (5, 7):
                lines = [quatrain(rng, length) for _ in range(count)]
                text = "\n".join(lines) + "\n"
                (folder / f"q{split}{length}").write_text(text, encoding="utf-8")
    return folder


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_arrays(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count).astype(np.uint8)
    images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):  # a learnable signal: a bright block at the label's place
        row, col = divmod(int(label), 5)
        images[i, 4 + 10 * row : 10 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 250
    return images, labels


def write_mnist(
    folder: Path, train: int = 120, test: int = 40, gz: bool = True, train_prefix: str = "train"
) -> dict[str, Path]:
    """IDX files; ``train_prefix="train-first10k"``-style names make a partial training set."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count, prefix in (("train", train, train_prefix), ("test", test, "t10k")):
        images, labels = mnist_arrays(count, seed=0 if split == "train" else 1)
        img_name = f"{prefix}-images-idx3-ubyte".replace(
            "train-first10k-images", "train-images-first10k"
        )
        lbl_name = f"{prefix}-labels-idx1-ubyte".replace(
            "train-first10k-labels", "train-labels-first10k"
        )
        for role, name, array in (("images", img_name, images), ("labels", lbl_name, labels)):
            data = idx_bytes(array)
            if gz:
                data, name = gzip.compress(data), name + ".gz"
            (folder / name).write_bytes(data)
            paths[f"{split}_{role}"] = folder / name
    return paths


def write_text(path: Path, repeats: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    verse = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind.\n"
    path.write_text(verse * repeats, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- HTTP server


class _Handler(http.server.SimpleHTTPRequestHandler):
    #: file name -> number of bytes to send before closing (a broken-off transfer)
    cut: dict[str, int] = {}  # noqa: RUF012
    #: names answered with zeros, without Content-Length, until the client hangs up (up to 1 GB)
    endless: frozenset[str] = frozenset()
    #: bytes sent of the endless answers
    sent: list[int]
    #: names answered slowly: Content-Length 1,000, then one byte every 0.1 s (50 in all, so that
    #: a client without an overall deadline sees a broken-off transfer after about 5 s)
    trickle: frozenset[str] = frozenset()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name in self.endless:
            self.send_response(200)
            self.end_headers()
            block = bytes(1 << 16)
            with contextlib.suppress(OSError):
                while self.sent[0] < 1 << 30:
                    self.wfile.write(block)
                    self.sent[0] += len(block)
            self.close_connection = True
            return
        if name in self.trickle:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            self.close_connection = True
            return
        if name in self.cut:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: self.cut[name]])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def http_server(
    directory: Path,
    cut: dict[str, int] | None = None,
    endless: Sequence[str] = (),
    sent: list[int] | None = None,
    trickle: Sequence[str] = (),
) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port); yields the base URL. ``cut``: files sent
    in part; ``endless``: names answered with an endless stream of zeros and no Content-Length
    (``sent[0]`` counts its bytes); ``trickle``: names answered one byte every 0.1 s."""
    attributes = {
        "cut": dict(cut or {}),
        "endless": frozenset(endless),
        "sent": sent or [0],
        "trickle": frozenset(trickle),
    }
    handler = type("Handler", (_Handler,), attributes)

    def factory(*args: object, **kwargs: object) -> http.server.BaseHTTPRequestHandler:
        return handler(*args, directory=str(directory), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- CLI


def run_cli(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m nestrnn.cli ARGS`` in ``cwd``."""
    environment = dict(os.environ)
    environment.update(env or {})
    environment.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return subprocess.run(
        [sys.executable, "-m", "nestrnn.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main_cli(argv: Sequence[str], capsys: Any) -> tuple[int, str, str]:
    """``nestrnn ARGV`` in this process: (exit status, stdout, stderr). An exception other than
    SystemExit escapes, i.e. fails the test with the traceback the user would have seen."""
    import torch

    from nestrnn.cli import main

    threads = torch.get_num_threads()
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, ok: Sequence[int] = (0,)) -> None:
    """Success, or exit status 2 with exactly one ``nestrnn <command>: error:`` line on stderr
    (argparse's usage lines and warnings may come before it), never a traceback."""
    assert "Traceback" not in err
    if code in ok:
        return
    assert code == 2, err
    lines = [line for line in err.split("\n") if line.strip()]
    errors = [line for line in lines if line.startswith(f"nestrnn {command}: error: ")]
    assert len(errors) == 1, err
    others = [line for line in lines if line not in errors]
    assert all(re.match(r"(usage: |warning: |\s+)", line) for line in others), err


def start_cli(
    args: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``python -m nestrnn ARGS`` started in the background (stdout and stderr piped)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "nestrnn", *args],
        cwd=cwd,
        env=environment,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def train_steps(run_dir: Path) -> list[int]:
    """The steps of the "train" records of a run (a torn last line left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("event") == "train":
                steps.append(record["step"])
    return steps


def wait_for_step(
    run_dir: Path, step: int, process: subprocess.Popen[str], timeout: float = 90
) -> None:
    """Wait until the run in ``run_dir`` has logged optimizer step ``step``."""
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in train_steps(run_dir)):
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")
        time.sleep(0.2)


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
    return found


def wait_until_gone(text: str, timeout: float = 60) -> None:
    """Wait until no process mentions ``text`` (e.g. a run directory) on its command line."""
    deadline = time.monotonic() + timeout
    while processes_mentioning(text):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes still running: {processes_mentioning(text)}")
        time.sleep(0.2)


def snapshot(folder: Path) -> dict[str, str]:
    """The sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def gz(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
        handle.write(data)
    return buffer.getvalue()
