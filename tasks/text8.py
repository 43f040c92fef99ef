"""text8 (Mahoney): the first 10^8 characters of cleaned English Wikipedia; bits per character.

The corpus has 27 symbols (``a``-``z`` and space) in one line. The usual split is contiguous: the
first 90M characters train, the next 5M validate, the last 5M test (``train_chars``, ``valid_chars``,
``test_chars``). The loader reads ``text8.zip`` (downloaded from http://mattmahoney.net/dc/ when
missing) or an already extracted ``text8`` file; the file must have exactly
``train_chars + valid_chars + test_chars`` characters, which catches a truncated copy. For the
canonical split the sha256 of the zip and of the extracted text are checked as well; for another
split a download is read up to :func:`zip_bound` bytes at most, and nothing is read or inflated
beyond the split's characters.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch
from nestrnn.tasks.base import DataOptions
from nestrnn.tasks.lm import CharLMTask, Vocab

from nestrnn.data_utils import DataError, RemoteFile, base_urls, check_file, fetch, resolve_data_dir

URL_ENV = "NESTRNN_TEXT8_URL"
BASE_URLS = ("http://mattmahoney.net/dc/",)
CANONICAL_CHARS = 100_000_000
#: the canonical text8.zip (sha256 and size as published by many independent projects)
ZIP = RemoteFile(
    "text8.zip",
    sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
    size=31_344_016,
)
#: sha256 of the extracted 100,000,000-byte ``text8``
TEXT_SHA256 = "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"
SYMBOLS = [" ", *"abcdefghijklmnopqrstuvwxyz"]
MEMBER = "text8"
HOW_TO = "Download http://mattmahoney.net/dc/text8.zip into {dir} (or point task.data_dir at it)."


def zip_bound(chars: int) -> int:
    """The most bytes a zip holding one member of ``chars`` characters may have: the member
    stored or deflated (deflate adds at most 5 bytes per 16 KiB block), and headers, a zip
    comment and zip64 records (at most 64 KiB in all), with room to spare."""
    return chars + chars // 100 + (128 << 10)


@dataclass
class Text8Options(DataOptions):
    name: str = "text8"  # the task
    train_chars: int = 90_000_000  # first characters used for training
    valid_chars: int = 5_000_000  # next characters used for validation
    test_chars: int = 5_000_000  # last characters used for testing


class Text8Task(CharLMTask):
    """text8 (first 10^8 characters of Wikipedia), 90M/5M/5M split: bits per character."""

    Options: ClassVar[type] = Text8Options
    config_defaults: ClassVar[dict[str, Any]] = {
        **CharLMTask.config_defaults,
        "train": {
            **CharLMTask.config_defaults["train"],
            "batch_size": 128,
            "steps_per_epoch": 2000,
            "eval_max_batches": 400,
        },
    }

    def __init__(self, options: Text8Options, seed: int = 0) -> None:
        super().__init__(options, seed)
        for key in ("train_chars", "valid_chars", "test_chars"):
            if getattr(options, key) <= 0:
                raise ValueError(f"task.{key} must be positive, got {getattr(options, key)}")

    @property
    def total(self) -> int:
        o = self.options
        return o.train_chars + o.valid_chars + o.test_chars

    @property
    def canonical(self) -> bool:
        return self.total == CANONICAL_CHARS

    def data_dir(self) -> Path:
        return resolve_data_dir(self.options.data_dir, "text8")

    def load_splits(self) -> dict[str, Any]:
        folder = self.data_dir()
        extracted = folder / MEMBER
        if extracted.exists() and not (folder / ZIP.name).exists():
            data = self._read_extracted(extracted)
            source = str(extracted)
        else:
            remote = ZIP if self.canonical else RemoteFile(ZIP.name, max_size=zip_bound(self.total))
            urls = base_urls(self.options.base_url, URL_ENV, BASE_URLS)
            path = fetch(
                remote,
                folder,
                urls,
                allow_download=self.options.download,
                validate=self._validate_zip,
                check_local=self._check_local_zip,
                how_to=HOW_TO.format(dir=folder),
            )
            data = read_zip(path, self.total)
            source = f"{path}:{MEMBER}"
        ids = self._encode(data, source)
        self.vocab = Vocab(SYMBOLS)
        o = self.options
        cut1, cut2 = o.train_chars, o.train_chars + o.valid_chars
        return {"train": ids[:cut1], "valid": ids[cut1:cut2], "test": ids[cut2:]}

    def _read_extracted(self, path: Path) -> bytes:
        """The extracted text, its length checked before it is read (a wrong file may be huge)."""
        try:
            size = path.stat().st_size
            if size != self.total:
                self._length_error(size, str(path))
            return path.read_bytes()
        except OSError as error:
            raise DataError(f"cannot read {path}: {error.strerror or error}") from None

    def _length_error(self, size: int, source: str) -> NoReturn:
        raise DataError(
            f"{source} has {size:,} characters, but the split needs {self.total:,}"
            + (" (truncated?)" if size < self.total else "")
        )

    def _check_local_zip(self, path: Path) -> None:
        if self.canonical:
            check_file(path, ZIP)
        self._validate_zip(path)

    def _validate_zip(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo(MEMBER)
        except (zipfile.BadZipFile, OSError) as error:
            raise DataError(
                f"{path} is not a readable zip file (truncated or corrupt?): {error}"
            ) from None
        except KeyError:
            raise DataError(f"{path} has no member {MEMBER!r}; is it text8.zip?") from None
        if info.file_size != self.total:
            raise DataError(
                f"{path}: {MEMBER} has {info.file_size:,} characters, but the split needs "
                f"{self.total:,} (train {self.options.train_chars:,} + valid "
                f"{self.options.valid_chars:,} + test {self.options.test_chars:,})"
            )

    def _encode(self, data: bytes, source: str) -> torch.Tensor:
        if len(data) != self.total:
            self._length_error(len(data), source)
        if self.canonical and hashlib.sha256(data).hexdigest() != TEXT_SHA256:
            raise DataError(f"{source} is corrupt: its sha256 is not that of the canonical text8")
        raw = np.frombuffer(data, dtype=np.uint8)
        table = np.full(256, 255, dtype=np.uint8)
        for i, symbol in enumerate(SYMBOLS):
            table[ord(symbol)] = i
        ids = table[raw]
        if (ids == 255).any():
            bad = int(raw[np.argmax(ids == 255)])
            raise DataError(f"{source} is not text8: it contains the byte {bad:#04x}")
        return torch.from_numpy(ids)

    def prepare(self) -> None:
        # ids come encoded already; skip the generic symbol path
        loaded = self.load_splits()
        self.splits = dict(loaded)
        self.unknown = {}

    def known_vocab_size(self) -> int:
        return len(SYMBOLS)

    def text_to_symbols(self, text: str) -> list[str]:
        return list(text.lower())


def read_zip(path: Path, chars: int) -> bytes:
    """The text8 member of a zip, inflated up to ``chars + 1`` characters at most (a zip bomb is
    not inflated further; the caller checks the length); a CRC error or short member is a
    DataError naming the file."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(MEMBER) as member:
            return member.read(chars + 1)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as error:
        raise DataError(f"{path} is corrupt: {error}") from None
