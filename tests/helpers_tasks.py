"""Shared helpers for the task, download, engine and CLI tests: fixture writers, a local HTTP
server, tiny configurations and the location of the optional real data."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import importlib.util
import io
import os
import random
import struct
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: the NestedLSTM backend the tests use: "auto" once the fused CPU op exists, else "generic"
BACKEND = os.environ.get("NESTRNN_TEST_BACKEND") or (
    "auto" if importlib.util.find_spec("nestrnn.ops.nested_lstm.fused") else "generic"
)

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

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
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
def http_server(directory: Path, cut: dict[str, int] | None = None) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port); yields the base URL."""
    handler = type("Handler", (_Handler,), {"cut": dict(cut or {})})

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
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def gz(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
        handle.write(data)
    return buffer.getvalue()
