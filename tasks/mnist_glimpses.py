"""MNIST read as a sequence of glimpses: predict the digit from the last state; NLL and error %.

Definition. Each 28x28 image is cut into square glimpses of ``glimpse_size`` pixels a side, taken
``stride`` pixels apart (``stride = glimpse_size`` by default: non-overlapping patches). The glimpse
grid is visited in ``order``:

* ``row``: row-major (left to right, then top to bottom), the default;
* ``column``: column-major (top to bottom, then left to right);
* ``snake``: row-major with every other row reversed (neighbouring glimpses stay adjacent);
* ``random``: one fixed random permutation of the grid (seeded by ``permutation_seed``).

Each glimpse becomes a vector of its pixels in row-major order, scaled to [0, 1] (and, with
``normalize``, standardised with the MNIST mean 0.1307 and std 0.3081). The defaults give 16 steps
of 49 values. The model reads the sequence and a linear layer on the last hidden state predicts the
class. Metrics: ``loss`` (mean negative log-likelihood, nats), ``error`` (% misclassified), ``acc``.

Data. The standard IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped or not) are read from
``data_dir`` and downloaded when missing. A partial training set under another name
(``train-images-first10k-idx3-ubyte.gz``) is used with a warning. The validation split is the last
``valid_size`` training images (-1: one twelfth, i.e. 5,000 of 60,000). Every IDX file is checked:
its header, its length against the header (truncation), gzip's CRC and, where the canonical
checksum is known, its sha256. A file is read as a stream, header first, and never inflated beyond
the size its header announces (at most that of the canonical file), so a gzip bomb costs nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from nestrnn.tasks.base import Batch, DataOptions, Task, fingerprint
from torch import Tensor, nn

from nestrnn.config import ModelConfig
from nestrnn.data_utils import (
    DataError,
    RemoteFile,
    base_urls,
    fetch,
    resolve_data_dir,
    sha256_file,
)
from nestrnn.engine.batching import ShuffledBatches, sequential_batches
from nestrnn.models import SequenceModel

URL_ENV = "NESTRNN_MNIST_URL"
BASE_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
IMAGE_SIZE = 28
MEAN, STD = 0.1307, 0.3081
FULL_TRAIN = 60_000
TEST_SIZE = 10_000

#: the canonical gzipped files: sha256 and size as served by the mirrors above
FILES = {
    "train_images": RemoteFile(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        9_912_422,
    ),
    "train_labels": RemoteFile(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        28_881,
    ),
    "test_images": RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        1_648_877,
    ),
    "test_labels": RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        4_542,
    ),
}
#: sha256 of the decompressed canonical content, where known (a re-compressed .gz still matches)
CONTENT_SHA256 = {
    "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
PATTERNS = {
    "train_images": "train-images*idx3-ubyte*",
    "train_labels": "train-labels*idx1-ubyte*",
    "test_images": "t10k-images*idx3-ubyte*",
    "test_labels": "t10k-labels*idx1-ubyte*",
}
HOW_TO = (
    "Download the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from " + BASE_URLS[0] + " into {dir}."
)
ORDERS = ("row", "column", "snake", "random")


@dataclass
class MnistGlimpsesOptions(DataOptions):
    name: str = "mnist_glimpses"  # the task
    glimpse_size: int = 7  # side of a square glimpse, in pixels
    stride: int = 0  # pixels between glimpses (0: glimpse_size, i.e. non-overlapping)
    order: str = "row"  # glimpse order: row | column | snake | random
    permutation_seed: int = 0  # seed of the fixed permutation of order=random
    normalize: bool = True  # standardise pixels with the MNIST mean and std
    valid_size: int = -1  # validation images taken from the end of the training file (-1: 1/12)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"order": ORDERS}


def read_idx(
    path: Path, expected_magic: int, max_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Read an IDX file (gzipped or not), checking magic number, shape and length.

    The file is read as a stream: the header first, whose shape may not exceed ``max_shape``
    (dimension by dimension), then exactly the bytes the header announces, and one more to tell
    that the file ends there. A file longer than its header says (a gzip bomb among them) is
    refused at that byte, so nothing beyond the announced size is ever inflated or held.
    """
    gzipped = False
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw) if gzipped else raw as stream:
                return _read_idx_stream(stream, path, expected_magic, max_shape)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        kind = "gzip: " if gzipped else ""
        raise DataError(f"{path} is corrupt or truncated ({kind}{error})") from None


def _read_idx_stream(
    stream: Any, path: Path, expected_magic: int, max_shape: tuple[int, ...] | None
) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path} is truncated: {len(head)} bytes")
    magic = struct.unpack(">I", head)[0]
    if magic != expected_magic:
        kind = "images (idx3)" if expected_magic == 2051 else "labels (idx1)"
        raise DataError(f"{path} is not an IDX file of {kind}: magic number {magic:#x}")
    ndim = magic & 0xFF
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path} is truncated: the header is incomplete")
    shape = struct.unpack(f">{ndim}I", dims)
    if max_shape is not None and any(n > most for n, most in zip(shape, max_shape)):
        raise DataError(
            f"{path} announces shape {shape} in its header, more than MNIST's {max_shape}; "
            "it is not an MNIST file"
        )
    header = 4 + 4 * ndim
    count = math.prod(shape)
    data = stream.read(count)
    if len(data) < count:
        raise DataError(
            f"{path} is truncated: its header announces shape {shape} ({header + count:,} "
            f"bytes) but it has {header + len(data):,} bytes"
        )
    if stream.read(1):
        raise DataError(
            f"{path} is too long: its header announces shape {shape} ({header + count:,} "
            "bytes) but it holds more; stopped reading it"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def idx_header(array: np.ndarray) -> bytes:
    """The IDX header of an unsigned-byte ``array`` (magic number and shape)."""
    return struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)


def max_shape(role: str) -> tuple[int, ...]:
    """The largest shape the IDX file of ``role`` may announce: the canonical file's."""
    count = FULL_TRAIN if role.startswith("train") else TEST_SIZE
    return (count, IMAGE_SIZE, IMAGE_SIZE) if role.endswith("images") else (count,)


def _validator(role: str) -> Any:
    magic = 2051 if role.endswith("images") else 2049

    def validate(path: Path) -> None:
        array = read_idx(path, magic, max_shape(role))
        if role.endswith("images") and array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: images are {array.shape[1:]}, expected 28x28")
        content = CONTENT_SHA256.get(role)
        if content is not None and array.shape == max_shape(role):
            digest = hashlib.sha256(idx_header(array))
            digest.update(array.data)
            if digest.hexdigest() != content:
                raise DataError(f"{path} is corrupt: its content differs from the canonical file")

    return validate


def _check_local(role: str) -> Any:
    validate = _validator(role)
    remote = FILES[role]

    def check(path: Path) -> None:
        # a canonical copy is recognised by its checksum; a re-compressed or partial copy is
        # accepted when its IDX content is valid (header, length, CRC, content checksum if known)
        canonical_size = path.name == remote.name and path.stat().st_size == remote.size
        if canonical_size and sha256_file(path) == remote.sha256:
            return
        validate(path)

    return check


def glimpse_order(rows: int, cols: int, order: str, seed: int) -> Tensor:
    """Indices into a row-major ``rows x cols`` glimpse grid, in visiting order."""
    grid = torch.arange(rows * cols).view(rows, cols)
    if order == "row":
        return grid.flatten()
    if order == "column":
        return grid.t().flatten()
    if order == "snake":
        return torch.cat([r if i % 2 == 0 else r.flip(0) for i, r in enumerate(grid)])
    if order == "random":
        return torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


class MnistGlimpsesTask(Task):
    """MNIST digits read as sequences of glimpses (7x7 patches, row-major): NLL and error %."""

    Options: ClassVar[type] = MnistGlimpsesOptions
    kind: ClassVar[str] = "classify"
    primary_metric: ClassVar[str] = "error"
    config_defaults: ClassVar[dict[str, Any]] = {
        "model": {"hidden_size": 128},
        "optim": {"lr": 0.001, "schedule": "plateau", "patience": 1},
        "train": {
            "epochs": 30,
            "steps_per_epoch": 0,
            "batch_size": 64,
            "eval_batch_size": 500,
            "log_every": 50,
            "early_stopping": 6,
        },
    }

    def __init__(self, options: MnistGlimpsesOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        g = options.glimpse_size
        stride = options.stride or g
        if not 1 <= g <= IMAGE_SIZE or stride < 1 or (IMAGE_SIZE - g) % stride:
            raise ValueError(
                f"task.glimpse_size={g} with stride {stride} does not tile a 28x28 image "
                "(need (28 - glimpse_size) divisible by stride), e.g. 7, 4, 14 or 28"
            )
        self.glimpse = g
        self.stride = stride
        self.grid = (IMAGE_SIZE - g) // stride + 1
        self.order = glimpse_order(self.grid, self.grid, options.order, options.permutation_seed)
        self.images: dict[str, Tensor] = {}
        self.labels: dict[str, Tensor] = {}
        self._train_batches: dict[int, ShuffledBatches] = {}

    @property
    def steps(self) -> int:
        return self.grid * self.grid

    def data_dir(self) -> Path:
        return resolve_data_dir(self.options.data_dir, "mnist")

    def _locate(self, folder: Path, role: str, urls: list[str]) -> Path:
        remote = FILES[role]
        for name in (remote.name, remote.name[: -len(".gz")]):
            if (folder / name).exists():
                return fetch(
                    RemoteFile(name) if name != remote.name else remote,
                    folder,
                    urls,
                    allow_download=False,
                    check_local=_check_local(role),
                )
        found = sorted(p for p in folder.glob(PATTERNS[role]) if not p.name.startswith("."))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"several candidate files for {role} in {folder}: {names}; keep one")
        if found:
            _validator(role)(found[0])
            return found[0]
        return fetch(
            remote,
            folder,
            urls,
            allow_download=self.options.download,
            validate=_validator(role),
            how_to=HOW_TO.format(dir=folder),
        )

    def prepare(self) -> None:
        folder = self.data_dir()
        urls = base_urls(self.options.base_url, URL_ENV, BASE_URLS)
        arrays = {}
        for role in FILES:
            path = self._locate(folder, role, urls)
            magic = 2051 if role.endswith("images") else 2049
            arrays[role] = (read_idx(path, magic, max_shape(role)), path)
        for split in ("train", "test"):
            (images, ipath), (labels, lpath) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if len(images) != len(labels):
                raise DataError(
                    f"{ipath} has {len(images):,} images but {lpath} has {len(labels):,} labels"
                )
            if labels.max() > 9:
                raise DataError(f"{lpath} has labels outside 0-9; is it corrupt?")
        train_images, train_path = arrays["train_images"]
        train_labels = arrays["train_labels"][0]
        n = len(train_images)
        if n < FULL_TRAIN:
            warnings.warn(
                f"{train_path.name} holds {n:,} of the 60,000 MNIST training images (a partial "
                "training set); results are not comparable with the full data",
                stacklevel=2,
            )
        valid = self.options.valid_size if self.options.valid_size >= 0 else round(n / 12)
        if not 0 < valid < n:
            raise ValueError(f"task.valid_size={valid} must be between 1 and {n - 1}")
        images = torch.from_numpy(train_images.copy())
        labels = torch.from_numpy(train_labels.astype(np.int64))
        self.images = {
            "train": images[:-valid],
            "valid": images[-valid:],
            "test": torch.from_numpy(arrays["test_images"][0].copy()),
        }
        self.labels = {
            "train": labels[:-valid],
            "valid": labels[-valid:],
            "test": torch.from_numpy(arrays["test_labels"][0].astype(np.int64)),
        }

    def data_fingerprint(self) -> str | None:
        """The images and labels of every split, the glimpse options and the shuffling seed."""
        splits = sorted(self.images)
        return fingerprint(
            super().data_fingerprint(),
            *(self.images[s] for s in splits),
            *(self.labels[s] for s in splits),
        )

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {len(v):,}" for s, v in self.images.items())
        return (
            f"images: {sizes}; {self.steps} glimpses of {self.glimpse}x{self.glimpse} "
            f"(stride {self.stride}, order {self.options.order})"
        )

    def glimpses(self, images: Tensor) -> Tensor:
        """(N, 28, 28) uint8 -> (N, steps, glimpse_size**2) float: the glimpse sequences."""
        x = images.float().div_(255.0)
        if self.options.normalize:
            x = (x - MEAN) / STD
        g, s = self.glimpse, self.stride
        patches = x.unfold(1, g, s).unfold(2, g, s)  # (N, grid, grid, g, g)
        patches = patches.reshape(x.shape[0], self.steps, g * g)
        return patches[:, self.order]

    def build_model(self, model_cfg: ModelConfig, hidden_size: int) -> nn.Module:
        return SequenceModel(model_cfg, self.glimpse * self.glimpse, 10, hidden_size, "last")

    def _batches(self, batch_size: int) -> ShuffledBatches:
        if batch_size not in self._train_batches:
            self._train_batches[batch_size] = ShuffledBatches(
                len(self.labels["train"]), batch_size, self.seed
            )
        return self._train_batches[batch_size]

    def num_train_batches(self, batch_size: int, bptt: int) -> int:
        return self._batches(batch_size).num_batches

    def train_batch(self, index: int, batch_size: int, bptt: int) -> Batch:
        rows = self._batches(batch_size).indices(index)
        return Batch(self.glimpses(self.images["train"][rows]), self.labels["train"][rows])

    def eval_batches(self, split: str, batch_size: int, bptt: int) -> Iterator[Batch]:
        for rows in sequential_batches(len(self.labels[split]), batch_size):
            yield Batch(self.glimpses(self.images[split][rows]), self.labels[split][rows])

    def loss(self, output: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        nll = F.cross_entropy(output.float(), batch.targets, reduction="sum")
        wrong = (output.argmax(-1) != batch.targets).sum()
        count = batch.targets.numel()
        stats = {
            "nll": nll.detach(),
            "wrong": wrong.detach().float(),
            "count": torch.tensor(float(count)),
        }
        return nll / count, stats

    def metrics(self, stats: dict[str, float]) -> dict[str, float]:
        count = max(stats["count"], 1.0)
        error = 100.0 * stats["wrong"] / count
        loss = stats["nll"] / count
        return {"loss": loss, "error": error, "acc": 100.0 - error}
