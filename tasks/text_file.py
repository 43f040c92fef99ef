"""Character-level language model on any UTF-8 text file: bits per character.

The file given as ``task.path`` is read as one stream of characters (line breaks included) and cut,
in order, into train / valid / test by ``valid_fraction`` and ``test_fraction`` (the last 5% each by
default). The vocabulary is every character of the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nestrnn.tasks.base import TaskOptions
from nestrnn.tasks.lm import CharLMTask, Vocab, split_contiguous

from nestrnn.data_utils import DataError, read_text


@dataclass
class TextFileOptions(TaskOptions):
    name: str = "text_file"  # the task
    path: str = ""  # the UTF-8 text file to model (required)
    valid_fraction: float = 0.05  # share of the file (after the training part) for validation
    test_fraction: float = 0.05  # share of the file (at its end) for testing


class TextFileTask(CharLMTask):
    """Character-level language model on any UTF-8 text file (task.path=FILE): bits per character."""

    Options: ClassVar[type] = TextFileOptions

    def __init__(self, options: TextFileOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        v, t = options.valid_fraction, options.test_fraction
        if not (0 < v < 1 and 0 < t < 1 and v + t < 1):
            raise ValueError(
                f"task.valid_fraction ({v}) and task.test_fraction ({t}) must be in (0, 1) and "
                "sum to less than 1"
            )

    def load_splits(self) -> dict[str, Any]:
        if not self.options.path:
            raise DataError("task text_file needs a file: set task.path=FILE (any UTF-8 text)")
        path = Path(self.options.path).expanduser()
        if path.is_dir():
            raise DataError(f"task.path: {path} is a folder; give a UTF-8 text file")
        if not path.is_file():
            raise DataError(f"task.path: no such file: {path}")
        text = read_text(path)
        if self.vocab is None:
            self.vocab = Vocab.build(text)
        try:
            return split_contiguous(text, self.options.valid_fraction, self.options.test_fraction)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from None
