"""Chinese quatrains of Zhang & Lapata (2014): per-character perplexity and bits per character.

Files (from the authors' data, ``partitions_in_Table_2/rnnpg/``): ``qtrain``, ``qvalid``, ``qtest``
and the same split by line length, ``qtrain5``/``qvalid5``/``qtest5`` and ``qtrain7``/...: one
quatrain per line, its four lines separated by TAB, characters separated by single spaces.

The stream of symbols is each quatrain's characters with a line-break symbol after each of its
first three lines and an end-of-poem symbol after the fourth. Characters not seen in training map to
``<unk>``. Metrics: ``loss`` (nats per symbol), ``bpc`` and ``ppl`` over all symbols, and
``ppl_char``, the perplexity over the Chinese characters only (line breaks and ends not counted).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from nestrnn.tasks.base import Batch, DataOptions
from nestrnn.tasks.lm import LN2, CharLMTask, Vocab
from torch import Tensor

from nestrnn.data_utils import DataError, read_text, resolve_data_dir

LINE = "\t"
END = "\n"
UNK = "<unk>"
#: the vocabulary of the published files per variant (their training characters, the line and end
#: symbols and <unk>), which sizes the models without the data
VOCAB_SIZES = {"all": 6222, "5": 5261, "7": 5754}
SOURCE = "http://homepages.inf.ed.ac.uk/mlap/Data/EMNLP14/"
HOW_TO = (
    "The quatrains have no stable download URL. Get the data of Zhang & Lapata (2014), "
    "'Chinese Poetry Generation with Recurrent Neural Networks', from " + SOURCE + " (linked from "
    "https://github.com/XingxingZhang/rnnpg; research use only), unpack it and copy the files "
    "qtrain, qvalid, qtest (and/or qtrain5 ... qtest7) from partitions_in_Table_2/rnnpg/ into "
    "{dir}, or point task.data_dir at that folder."
)


@dataclass
class ChinesePoemsOptions(DataOptions):
    name: str = "chinese_poems"  # the task
    variant: str = "all"  # all (5- and 7-character quatrains) | 5 | 7
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"variant": ("all", "5", "7")}


def parse(text: str, path: Path | str, length: int | None) -> list[str]:
    """The symbols of a quatrain file; checks its format (names file and line on error).

    A file cut short ends inside a quatrain, which fails the check (the authors' files may lack a
    final line break, so that alone is not an error).
    """
    symbols: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        verses = line.split("\t")
        chars = [verse.split() for verse in verses]
        sizes = {len(c) for c in chars}
        if len(verses) != 4 or len(sizes) != 1 or sizes - {5, 7}:
            raise DataError(
                f"{path}, line {number}: not a quatrain (4 TAB-separated lines of 5 or 7 "
                "space-separated characters); is the file corrupt?"
            )
        if length is not None and sizes != {length}:
            raise DataError(
                f"{path}, line {number}: a {sizes.pop()}-character quatrain in the "
                f"{length}-character file"
            )
        for i, verse in enumerate(chars):
            symbols.extend(verse)
            symbols.append(LINE if i < 3 else END)
    if not symbols:
        raise DataError(f"{path} has no quatrains")
    return symbols


class ChinesePoemsTask(CharLMTask):
    """Chinese quatrains (Zhang & Lapata 2014): per-character perplexity and bits per character."""

    Options: ClassVar[type] = ChinesePoemsOptions
    primary_metric: ClassVar[str] = "ppl"
    display: ClassVar[dict[str, str]] = {LINE: "\n", END: "\n\n"}
    config_defaults: ClassVar[dict[str, Any]] = {
        **CharLMTask.config_defaults,
        "train": {**CharLMTask.config_defaults["train"], "bptt": 48, "batch_size": 32},
    }

    def data_dir(self) -> Path:
        return resolve_data_dir(self.options.data_dir, "chinese_poems")

    def _files(self, folder: Path, split: str) -> list[Path]:
        variant = self.options.variant
        suffix = "" if variant == "all" else variant
        path = folder / f"q{split}{suffix}"
        if path.exists():
            return [path]
        parts = [folder / f"q{split}{n}" for n in ("5", "7")]
        if variant == "all" and all(p.exists() for p in parts):
            warnings.warn(
                f"{path} is missing; using {parts[0].name} and {parts[1].name} together instead",
                stacklevel=2,
            )
            return parts
        raise DataError(f"{path} is missing. " + HOW_TO.format(dir=folder))

    def load_splits(self) -> dict[str, Any]:
        folder = self.data_dir()
        length = None if self.options.variant == "all" else int(self.options.variant)
        splits: dict[str, list[str]] = {}
        for split in ("train", "valid", "test"):
            symbols: list[str] = []
            for path in self._files(folder, split):
                symbols.extend(parse(read_text(path), path, length))
            splits[split] = symbols
        return splits

    def known_vocab_size(self) -> int:
        return VOCAB_SIZES[self.options.variant]

    def build_vocab(self, train: Any) -> Vocab:
        return Vocab.build(train, unk=UNK)

    def loss(self, output: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        targets = batch.targets.reshape(-1)
        nll = F.cross_entropy(
            output.reshape(-1, output.shape[-1]).float(), targets, reduction="none"
        )
        special = torch.tensor(
            [self.vocab.index[LINE], self.vocab.index[END]], device=targets.device
        )
        is_char = ~torch.isin(targets, special)
        total = nll.sum()
        stats = {
            "nll": total.detach(),
            "count": torch.tensor(float(targets.numel())),
            "nll_char": (nll * is_char).sum().detach(),
            "count_char": is_char.sum().detach().float(),
        }
        return total / targets.numel(), stats

    def metrics(self, stats: dict[str, float]) -> dict[str, float]:
        loss = stats["nll"] / max(stats["count"], 1.0)
        char = stats.get("nll_char", 0.0) / max(stats.get("count_char", 0.0), 1.0)
        return {
            "loss": loss,
            "bpc": loss / LN2,
            "ppl": math.exp(min(loss, 50.0)),
            "ppl_char": math.exp(min(char, 50.0)),
        }

    def text_to_symbols(self, text: str) -> list[str]:
        symbols = []
        for ch in text:
            if ch in "/\t":
                symbols.append(LINE)
            elif ch == "\n":
                symbols.append(END)
            elif not ch.isspace():
                symbols.append(ch)
        return symbols
